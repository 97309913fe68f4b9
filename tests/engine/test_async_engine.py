"""The asyncio front: concurrent streams match the engine run alone; aborts, errors, backpressure, death, drain."""

import asyncio
import time

import pytest
import torch
from live_server import fail_after

from server.engine.async_engine import AsyncEngine, EngineDeadError, QueueFullError
from server.engine.engine import EngineConfig, LLMEngine
from server.engine.scheduler import CapacityError
from tpa_model.checkpoints.demo import build_demo
from tpa_model.checkpoints.loader import load_model
from tpa_model.sampling import ParamError, SamplingParams
from tpa_model.tokenizers.gemma_tokenizer import GemmaTokenizer


@pytest.fixture(scope="module")
def model_and_tokenizer(tmp_path_factory):
    path = tmp_path_factory.mktemp("async_engine_model")
    build_demo(path)
    return load_model(path), GemmaTokenizer.from_dir(path)


@pytest.fixture
def engine(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    return make_engine(model, tokenizer)


def make_engine(model, tokenizer, num_blocks=64, **kw) -> LLMEngine:
    return LLMEngine(model, tokenizer, EngineConfig(block_size=4, num_blocks=num_blocks, **kw))


def greedy(max_tokens: int) -> SamplingParams:
    return SamplingParams(temperature=0.0, ignore_eos=True, max_tokens=max_tokens)


def prompts(n: int, seed: int = 0) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(5, 30, (n,), generator=gen).tolist()
    return [[2] + torch.randint(10, 400, (length,), generator=gen).tolist() for length in lengths]


def idle_and_free(engine: LLMEngine) -> bool:
    return (not engine.scheduler.running and not engine.scheduler.waiting and not engine.requests
            and all(used == 0 for used, _ in engine.block_usage().values()))


async def wait_until(predicate, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out waiting for the engine thread"
        await asyncio.sleep(0.005)


def run(coro, timeout: float = 30.0):
    """asyncio.run with a deadline, so a stream that never ends fails the test instead of hanging it."""
    return asyncio.run(asyncio.wait_for(coro, timeout))


async def collect(agen) -> list:
    return [out async for out in agen]


def test_concurrent_streams_equal_engine_alone(engine, model_and_tokenizer):
    ps = prompts(8)
    alone = make_engine(*model_and_tokenizer)
    expected = []
    for i, p in enumerate(ps):
        alone.add_request(f"alone{i}", p, greedy(12))
        while alone.has_unfinished():
            finals = [o for o in alone.step() if o.finished]
        expected.append(finals[0].outputs[0])

    async def main():
        ae = AsyncEngine(engine)
        ae.start()
        peak = 0

        async def consume(i):
            nonlocal peak
            outs = []
            async for out in ae.generate(ps[i], greedy(12), request_id=f"r{i}"):
                peak = max(peak, ae.stats().num_running)
                outs.append(out)
            return outs

        results = await asyncio.gather(*(consume(i) for i in range(8)))
        stats = ae.stats()
        await ae.shutdown()
        return results, peak, stats, ae

    results, peak, stats, ae = run(main())
    for i, outs in enumerate(results):
        final = outs[-1].outputs[0]
        assert outs[-1].finished and not any(o.finished for o in outs[:-1])
        assert outs[-1].request_id == f"r{i}"
        assert final.token_ids == expected[i].token_ids, f"request {i} differs from the engine run alone"
        assert final.text == expected[i].text and final.finish_reason == "length"
        assert "".join(o.outputs[0].delta_text for o in outs) == final.text
        assert [t for o in outs for t in o.outputs[0].delta_token_ids] == final.token_ids
    assert peak > 1, "the requests never ran in one batch"
    assert stats.num_generated_tokens == 8 * 12 and stats.num_prompt_tokens == sum(map(len, ps))
    assert stats.num_in_flight == 0 and all(used == 0 for used, _ in stats.block_usage.values())
    assert not ae._thread.is_alive() and not ae.is_alive
    assert idle_and_free(engine)


def test_aclose_after_three_outputs_aborts_and_frees(engine):
    async def main():
        ae = AsyncEngine(engine)
        ae.start()
        agen = ae.generate(prompts(1)[0], greedy(200))
        for _ in range(3):
            out = await agen.__anext__()
        assert not out.finished
        await agen.aclose()
        await wait_until(lambda: idle_and_free(engine))
        assert engine.num_generated_tokens < 200, "the request ran to the end instead of being aborted"
        assert ae.stats().num_in_flight == 0
        # The engine keeps serving.
        outs = await collect(ae.generate(prompts(1, seed=1)[0], greedy(4)))
        assert outs[-1].finished and len(outs[-1].outputs[0].token_ids) == 4
        await ae.shutdown()

    run(main())


def test_cancelled_consumer_aborts_and_frees(engine):
    async def main():
        ae = AsyncEngine(engine)
        ae.start()
        three = asyncio.Event()

        async def consume():
            n = 0
            async for _ in ae.generate(prompts(1)[0], greedy(200)):
                n += 1
                if n == 3:
                    three.set()

        task = asyncio.create_task(consume())
        await three.wait()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await wait_until(lambda: idle_and_free(engine))
        assert engine.num_generated_tokens < 200
        assert ae.stats().num_in_flight == 0 and ae.is_alive
        await ae.shutdown()

    run(main())


def test_requests_that_can_never_run_fail_alone(engine):
    async def main():
        ae = AsyncEngine(engine)
        ae.start()
        too_long = [2] + [10] * 5000  # past max_model_len (the 64 * 4 tokens the global layers' cache holds)
        with pytest.raises(ValueError, match="maximum model length"):
            await collect(ae.generate(too_long, greedy(4)))
        small = AsyncEngine(make_engine(engine.model, engine.tokenizer, num_blocks={"global": 64, "sliding": 40}))
        small.start()
        with pytest.raises(CapacityError):  # fits the model length, not the sliding pool's 40 blocks
            await small.submit([2] + [10] * 249, greedy(4))
        await small.shutdown()
        with pytest.raises(ParamError):
            await collect(ae.generate([2, 10], SamplingParams(temperature=5.0)))
        with pytest.raises(ValueError, match="token ids"):
            await collect(ae.generate([2, 100_000], greedy(4)))  # would crash the embedding lookup
        assert ae.is_alive and ae.stats().num_in_flight == 0
        outs = await collect(ae.generate(prompts(1)[0], greedy(5)))
        assert outs[-1].finished and len(outs[-1].outputs[0].token_ids) == 5
        await ae.shutdown()

    run(main())
    assert idle_and_free(engine)


def test_queue_full_before_start(engine):
    """Submitted before start(), requests stay pending, so the limit is hit without any timing."""

    async def main():
        ae = AsyncEngine(engine, max_waiting=1)
        first = asyncio.create_task(collect(ae.generate(prompts(1)[0], greedy(3))))
        await asyncio.sleep(0)  # first is queued and waits for the engine thread
        assert ae.stats().num_pending == 1
        with pytest.raises(QueueFullError):
            await ae.submit(prompts(1, seed=1)[0], greedy(3))
        with pytest.raises(QueueFullError):
            await collect(ae.generate(prompts(1, seed=2)[0], greedy(3)))
        ae.start()
        outs = await first
        assert outs[-1].finished
        outs = await collect(ae.generate(prompts(1, seed=1)[0], greedy(3)))  # room again
        assert outs[-1].finished
        await ae.shutdown()

    run(main())


def test_queue_full_counts_scheduler_waiting(model_and_tokenizer):
    engine = make_engine(*model_and_tokenizer, max_num_seqs=1)  # one runs, the rest wait in the scheduler

    async def main():
        ae = AsyncEngine(engine, max_waiting=2)
        ae.start()
        running = await ae.submit(prompts(1)[0], greedy(200))
        await running.__anext__()
        waiting = [await ae.submit(p, greedy(3)) for p in prompts(2, seed=1)]
        assert len(engine.scheduler.waiting) == 2
        with pytest.raises(QueueFullError):
            await ae.submit(prompts(1, seed=2)[0], greedy(3))
        running.close()
        for stream in waiting:
            outs = [out async for out in stream]
            assert outs[-1].finished and outs[-1].outputs[0].finish_reason == "length"
        with pytest.raises(StopAsyncIteration):  # closed: nothing more is read
            await running.__anext__()
        await ae.shutdown()

    run(main())
    assert idle_and_free(engine)


def test_step_failure_kills_the_engine(engine, monkeypatch):
    monkeypatch.setattr(engine, "step", fail_after(engine.step, 4, "boom"))

    async def main():
        ae = AsyncEngine(engine)
        ae.start()

        async def consume(p):
            outs = []
            with pytest.raises(EngineDeadError) as info:
                async for out in ae.generate(p, greedy(50)):
                    outs.append(out)
            return outs, info.value

        results = await asyncio.gather(*(consume(p) for p in prompts(2)))
        for outs, err in results:
            assert 0 < len(outs) <= 4 and not outs[-1].finished
            assert isinstance(err.cause, RuntimeError) and err.__cause__ is err.cause
        assert not ae.is_alive and str(ae.fatal_error) == "boom"
        with pytest.raises(EngineDeadError):
            await collect(ae.generate(prompts(1)[0], greedy(3)))
        assert not ae.stats().is_alive
        await wait_until(lambda: not ae._thread.is_alive())
        await ae.shutdown()  # harmless on a dead engine

    run(main())


def test_drain_and_shutdown(engine):
    async def main():
        ae = AsyncEngine(engine)
        ae.start()
        assert await ae.drain(0)  # idle: returns at once

        tasks = [asyncio.create_task(collect(ae.generate(p, greedy(8)))) for p in prompts(3)]
        await asyncio.sleep(0)
        assert ae.stats().num_in_flight == 3
        assert await ae.drain(10)
        assert all(t.done() and t.result()[-1].finished for t in tasks)

        # Past the timeout the rest is aborted: the stream ends with finish_reason "abort".
        agen = ae.generate(prompts(1)[0], greedy(200))
        first = await agen.__anext__()
        assert not await ae.drain(0)
        rest = await collect(agen)
        assert rest[-1].finished and rest[-1].outputs[0].finish_reason == "abort"
        assert rest[-1].outputs[0].token_ids[: len(first.outputs[0].token_ids)] == first.outputs[0].token_ids
        await wait_until(lambda: idle_and_free(engine))

        # Shutdown with a request in flight: it fails, the thread joins, every block comes back.
        agen = ae.generate(prompts(1, seed=1)[0], greedy(200))
        await agen.__anext__()
        await ae.shutdown()
        assert not ae._thread.is_alive() and not ae.is_alive and ae.fatal_error is None
        with pytest.raises(EngineDeadError, match="shut down"):
            await collect(agen)
        assert idle_and_free(engine)
        with pytest.raises(EngineDeadError):
            await ae.submit(prompts(1)[0], greedy(3))
        ae.stop()  # idempotent

    run(main())
