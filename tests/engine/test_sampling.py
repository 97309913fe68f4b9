"""Sampling: greedy and truncation edge cases, empirical distributions, penalties, logprobs, seeded batch
invariance and parameter validation."""

from __future__ import annotations

import math
from collections import Counter

import pytest
import torch

from tpa_model.sampling import (
    ParamError,
    SamplingParams,
    apply_logit_bias,
    apply_penalties,
    make_generator,
    sample,
)

# Deliberately not in descending order, so the sort and the scatter back to vocabulary order are exercised.
# softmax: token 1 ~0.342, 4 ~0.280, 3 ~0.207, 0 ~0.126, 2 ~0.046.
LOGITS5 = [0.0, 1.0, -1.0, 0.5, 0.8]


def run(logits: torch.Tensor, params: list[SamplingParams], generators=None, prompts=None, outputs=None):
    batch = logits.shape[0]
    return sample(
        logits,
        params,
        generators if generators is not None else [None] * batch,
        prompts if prompts is not None else [[] for _ in range(batch)],
        outputs if outputs is not None else [[] for _ in range(batch)],
    )


def draws(params: SamplingParams, count: int, seed: int = 0, logits=LOGITS5) -> Counter:
    """`count` draws from one seeded generator shared by `count` identical rows of one batch."""
    x = torch.tensor([logits] * count)
    gen = make_generator(seed, "cpu")
    return Counter(run(x, [params] * count, [gen] * count).token_ids)


def random_logits(batch: int, vocab: int, seed: int) -> torch.Tensor:
    return torch.randn(batch, vocab, generator=torch.Generator().manual_seed(seed)) * 3


# -- greedy and truncation edge cases ------------------------------------------------------------------------


def test_greedy_is_argmax():
    x = random_logits(6, 100, 0)
    for t in (0.0, 1e-6):  # 0 and anything below the greedy threshold
        out = run(x, [SamplingParams(temperature=t)] * 6)
        assert out.token_ids == x.argmax(dim=-1).tolist()


def test_low_temperature_sampling_approaches_argmax():
    x = random_logits(200, 50, 1)
    params = [SamplingParams(temperature=1e-3, seed=i) for i in range(200)]
    gens = [make_generator(p.seed, "cpu") for p in params]
    assert run(x, params, gens).token_ids == x.argmax(dim=-1).tolist()
    # ...while temperature 1 on the same rows does not always pick the argmax.
    hot = run(x, [SamplingParams(seed=i) for i in range(200)], [make_generator(i, "cpu") for i in range(200)])
    assert hot.token_ids != x.argmax(dim=-1).tolist()


@pytest.mark.parametrize(
    "params",
    [SamplingParams(top_k=1), SamplingParams(top_p=1e-6), SamplingParams(min_p=1.0)],
    ids=["top_k=1", "top_p=tiny", "min_p=1"],
)
def test_truncation_to_one_token_equals_greedy(params):
    x = random_logits(64, 300, 2)
    gens = [make_generator(i, "cpu") for i in range(64)]
    assert run(x, [params] * 64, gens).token_ids == x.argmax(dim=-1).tolist()


# -- empirical distributions ---------------------------------------------------------------------------------


def assert_matches(counts: Counter, expected: dict[int, float], total: int, tol: float = 0.015) -> None:
    assert set(counts) == set(expected), f"tokens drawn {sorted(counts)} != expected support {sorted(expected)}"
    for token, p in expected.items():
        assert abs(counts[token] / total - p) < tol, (token, counts[token] / total, p)


def softmax_over(tokens: list[int], logits=LOGITS5) -> dict[int, float]:
    z = sum(math.exp(logits[t]) for t in tokens)
    return {t: math.exp(logits[t]) / z for t in tokens}


def test_temperature_one_matches_softmax():
    total = 20_000
    assert_matches(draws(SamplingParams(), total), softmax_over([0, 1, 2, 3, 4]), total)


def test_unseeded_rows_match_softmax():
    total = 20_000
    torch.manual_seed(0)
    counts = Counter(run(torch.tensor([LOGITS5] * total), [SamplingParams()] * total).token_ids)
    assert_matches(counts, softmax_over([0, 1, 2, 3, 4]), total)


def test_temperature_scales_logits():
    total = 20_000
    expected = softmax_over([0, 1, 2, 3, 4], [v / 0.5 for v in LOGITS5])
    assert_matches(draws(SamplingParams(temperature=0.5), total), expected, total)


def test_top_k_keeps_only_the_k_most_likely():
    total = 20_000
    assert_matches(draws(SamplingParams(top_k=2), total), softmax_over([1, 4]), total)


def test_top_p_keeps_the_smallest_nucleus():
    # Cumulative in descending order: 0.342 (token 1), 0.621 (4), 0.828 (3): 0.7 is reached with token 3.
    total = 20_000
    assert_matches(draws(SamplingParams(top_p=0.7), total), softmax_over([1, 4, 3]), total)


def test_min_p_drops_tokens_below_a_fraction_of_the_max():
    # Relative to token 1: 4 -> 0.82, 3 -> 0.61, 0 -> 0.37, 2 -> 0.14.
    total = 20_000
    assert_matches(draws(SamplingParams(min_p=0.5), total), softmax_over([1, 4, 3]), total)


def test_top_k_then_top_p_renormalizes_over_the_top_k():
    # Over tokens {1, 4} the top token has 0.55 >= 0.5, so only it is left.
    assert set(draws(SamplingParams(top_k=2, top_p=0.5), 2000)) == {1}
    # Over all five tokens 0.342 < 0.5, so top_p=0.5 alone keeps two.
    assert set(draws(SamplingParams(top_p=0.5), 2000)) == {1, 4}


def test_masked_vocabulary_is_never_drawn():
    x = torch.tensor([LOGITS5 + [float("-inf")] * 3] * 5000)
    counts = Counter(run(x, [SamplingParams()] * 5000, [make_generator(3, "cpu")] * 5000).token_ids)
    assert set(counts) == {0, 1, 2, 3, 4}


# -- penalties -----------------------------------------------------------------------------------------------


def test_penalties_match_hand_computed_values():
    base = [1.0, -1.0, 2.0, -2.0, 0.5, 0.0]
    logits = torch.tensor([base] * 4)
    prompts = [[0, 1]] * 4
    outputs = [[2, 2, 3]] * 4
    params = [
        SamplingParams(repetition_penalty=2.0),
        SamplingParams(frequency_penalty=0.5),
        SamplingParams(presence_penalty=0.25),
        SamplingParams(repetition_penalty=2.0, frequency_penalty=0.5, presence_penalty=0.25),
    ]
    out = apply_penalties(logits, prompts, outputs, params)
    expected = torch.tensor([
        # prompt and output tokens: positive / 2, negative * 2
        [0.5, -2.0, 1.0, -4.0, 0.5, 0.0],
        # frequency counts only the output: token 2 twice, token 3 once
        [1.0, -1.0, 2.0 - 1.0, -2.0 - 0.5, 0.5, 0.0],
        # presence: once per distinct output token
        [1.0, -1.0, 2.0 - 0.25, -2.0 - 0.25, 0.5, 0.0],
        # all three: repetition first, then frequency and presence
        [0.5, -2.0, 1.0 - 1.0 - 0.25, -4.0 - 0.5 - 0.25, 0.5, 0.0],
    ])
    torch.testing.assert_close(out, expected)
    assert torch.equal(logits, torch.tensor([base] * 4)), "the input must not be modified"


def test_rows_without_penalties_are_untouched():
    logits = random_logits(3, 20, 4)
    prompts = [[1, 2, 3]] * 3
    outputs = [[4, 4, 5]] * 3
    params = [SamplingParams(), SamplingParams(frequency_penalty=1.0), SamplingParams(temperature=0.3)]
    out = apply_penalties(logits, prompts, outputs, params)
    assert torch.equal(out[0], logits[0]) and torch.equal(out[2], logits[2])
    assert not torch.equal(out[1], logits[1])
    # With no penalized row at all, nothing is computed or copied.
    assert apply_penalties(logits, prompts, outputs, [SamplingParams()] * 3) is logits


def test_penalties_change_the_greedy_choice():
    x = torch.tensor([[3.0, 2.5, 0.0]])
    assert run(x, [SamplingParams(temperature=0)], outputs=[[0]]).token_ids == [0]
    assert run(x, [SamplingParams(temperature=0, presence_penalty=1.0)], outputs=[[0]]).token_ids == [1]
    assert run(x, [SamplingParams(temperature=0, repetition_penalty=1.5)], prompts=[[0]]).token_ids == [1]
    # frequency and presence ignore the prompt
    assert run(x, [SamplingParams(temperature=0, frequency_penalty=2.0)], prompts=[[0]]).token_ids == [0]


def test_logit_bias_adds_to_the_listed_tokens_of_its_own_row():
    logits = random_logits(3, 8, 6)
    logits[2, 5] = float("-inf")  # a token the engine never samples
    params = [SamplingParams(logit_bias={1: 2.5, 7: -100.0}), SamplingParams(), SamplingParams(logit_bias={5: 100.0})]
    before = logits.clone()
    out = apply_logit_bias(logits, params)
    expected = before.clone()
    expected[0, 1] += 2.5
    expected[0, 7] -= 100.0
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    assert torch.equal(logits, before), "the input must not be modified"
    assert out[2, 5] == float("-inf"), "a bias does not bring back a token that is never sampled"
    assert apply_logit_bias(logits, [SamplingParams()] * 3) is logits


def test_logit_bias_forces_bans_and_shows_in_the_logprobs():
    x = torch.tensor([LOGITS5] * 4)
    params = [SamplingParams(temperature=0, logit_bias={2: 100.0}, logprobs=1),
              SamplingParams(temperature=0, logit_bias={1: -100.0}),
              SamplingParams(seed=3, logit_bias={0: 100.0}),  # sampled, still all but certain
              SamplingParams(temperature=0, logprobs=1)]
    out = run(x, params, [make_generator(p.seed, "cpu") for p in params])
    assert out.token_ids == [2, 4, 0, 1]  # unbiased argmax is 1, then 4
    biased = torch.tensor(LOGITS5)
    biased[2] += 100.0
    assert out.logprobs[0] == pytest.approx(torch.log_softmax(biased, -1)[2].item(), abs=1e-6)
    assert out.logprobs[3] == pytest.approx(torch.log_softmax(torch.tensor(LOGITS5), -1)[1].item(), abs=1e-6)


# -- seeded batch invariance ---------------------------------------------------------------------------------

BATCH_PARAMS = [
    SamplingParams(seed=11, temperature=0.9, top_p=0.9),
    SamplingParams(temperature=0.7),  # unseeded
    SamplingParams(seed=12, top_k=20, frequency_penalty=0.5),
    SamplingParams(temperature=0),  # greedy
    SamplingParams(seed=13, min_p=0.05, temperature=1.3, repetition_penalty=1.2),
    SamplingParams(top_p=0.5, presence_penalty=1.0),  # unseeded
    SamplingParams(seed=14, top_k=5, top_p=0.8, logprobs=3),
    SamplingParams(seed=15),
]


def generate(rows: list[int], steps: int, vocab: int = 64) -> dict[int, list[int]]:
    """Run `steps` sampling steps over the given rows of BATCH_PARAMS, with fresh generators."""
    params = [BATCH_PARAMS[i] for i in rows]
    gens = [make_generator(p.seed, "cpu") for p in params]
    prompts = [[(7 * i) % vocab, (3 * i + 1) % vocab] for i in rows]
    outputs: list[list[int]] = [[] for _ in rows]
    for step in range(steps):
        all_logits = random_logits(len(BATCH_PARAMS), vocab, 100 + step)  # row i's logits do not depend on rows
        out = run(all_logits[rows], params, gens, prompts, outputs)
        for j, token in enumerate(out.token_ids):
            outputs[j].append(token)
    return dict(zip(rows, outputs))


def test_seeded_rows_draw_the_same_alone_or_in_a_batch():
    torch.manual_seed(1)
    batched = generate(list(range(len(BATCH_PARAMS))), steps=30)
    seeded = [i for i, p in enumerate(BATCH_PARAMS) if p.seed is not None]
    for i in seeded:
        torch.manual_seed(1000 + i)  # the global RNG must not matter to seeded rows
        alone = generate([i], steps=30)
        assert alone[i] == batched[i], f"row {i} drew differently alone"
    # The order of the batch does not matter either.
    torch.manual_seed(2)
    assert generate(seeded[::-1], steps=30) == {i: batched[i] for i in seeded}
    # And the draws really are random: the same seeded row with another seed diverges.
    assert generate([0], steps=30)[0] != generate([7], steps=30)[7]


def test_make_generator():
    assert make_generator(None, "cpu") is None
    a, b = make_generator(5, "cpu"), make_generator(5, "cpu")
    assert torch.equal(torch.rand(8, generator=a), torch.rand(8, generator=b))


# -- logprobs ------------------------------------------------------------------------------------------------


def test_logprobs_are_from_the_penalized_distribution_before_temperature():
    x = random_logits(4, 40, 5)
    prompts = [[1, 2], [3], [4], [5]]
    outputs = [[6, 6], [7], [8], [9]]
    params = [
        SamplingParams(temperature=0, logprobs=5, repetition_penalty=1.3, frequency_penalty=0.4),
        SamplingParams(temperature=0.5, top_k=3, logprobs=2, seed=3),
        SamplingParams(temperature=0.8),  # no logprobs
        SamplingParams(temperature=0, logprobs=0),
    ]
    gens = [make_generator(p.seed, "cpu") for p in params]
    out = run(x, params, gens, prompts, outputs)
    reference = torch.log_softmax(apply_penalties(x, prompts, outputs, params), dim=-1)

    for i in (0, 1, 3):
        assert out.logprobs[i] == pytest.approx(reference[i, out.token_ids[i]].item(), abs=1e-5)
        top = out.top_logprobs[i]
        assert len(top) == params[i].logprobs
        values = [v for _, v in top]
        assert values == sorted(values, reverse=True)
        for token, value in top:
            assert value == pytest.approx(reference[i, token].item(), abs=1e-5)
        if top:
            assert top[0][1] == pytest.approx(reference[i].max().item(), abs=1e-5)
    # Greedy: the chosen token is the top alternative.
    assert out.top_logprobs[0][0][0] == out.token_ids[0]
    assert out.logprobs[0] == pytest.approx(out.top_logprobs[0][0][1])
    # Not asked: None; logprobs=0: the chosen token's logprob with no alternatives.
    assert out.logprobs[2] is None and out.top_logprobs[2] is None
    assert out.top_logprobs[3] == []


# -- validation ----------------------------------------------------------------------------------------------


def test_defaults_validate():
    SamplingParams().validate()
    SamplingParams(n=3, temperature=2, top_p=1, top_k=-1, min_p=1, presence_penalty=-2, frequency_penalty=2,
                   repetition_penalty=5.0, seed=-1, max_tokens=None, stop=["a", "b", "c", "d"], logprobs=20).validate()


def test_single_stop_string_becomes_a_list():
    assert SamplingParams(stop="###").stop == ["###"]


@pytest.mark.parametrize(
    "field, value, shown",
    [
        ("n", 0, "0"),
        ("temperature", 3.5, "3.5"),
        ("temperature", -0.1, "-0.1"),
        ("temperature", float("nan"), "nan"),
        ("top_p", 0.0, "0.0"),
        ("top_p", 1.5, "1.5"),
        ("top_k", -2, "-2"),
        ("min_p", 1.5, "1.5"),
        ("min_p", -0.5, "-0.5"),
        ("presence_penalty", 2.5, "2.5"),
        ("frequency_penalty", -3.0, "-3.0"),
        ("repetition_penalty", 0.0, "0.0"),
        ("seed", 2**64, str(2**64)),
        ("max_tokens", -1, "-1"),
        ("logprobs", 21, "21"),
        ("logprobs", -1, "-1"),
        ("stop", ["a", "b", "c", "d", "e"], "5"),
        ("stop", ["ok", ""], "''"),
        ("stop_token_ids", [1, -4], "-4"),
        ("logit_bias", {3: 100.5}, "100.5"),
        ("logit_bias", {3: float("nan")}, "nan"),
        ("logit_bias", {-1: 1.0}, "-1"),
    ],
)
def test_validate_names_the_bad_field(field, value, shown):
    params = SamplingParams(**{field: value})
    with pytest.raises(ParamError) as err:
        params.validate()
    assert err.value.param == field
    assert isinstance(err.value, ValueError)
    message = str(err.value)
    assert message.startswith(field) and shown in message, message


def test_temperature_message_reads_like_the_api():
    with pytest.raises(ParamError, match=r"^temperature must be between 0 and 2, got 3\.5$"):
        SamplingParams(temperature=3.5).validate()
