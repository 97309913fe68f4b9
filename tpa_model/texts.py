"""`python -m tpa_model.texts [--list eval|calibration]`, the command docs/QUALITY.md gives for fetching the
held-out prose and showing its split. The prose and the command live in evaluation/texts.py; this module keeps
the command's name."""

import sys

from .evaluation.texts import main

if __name__ == "__main__":
    sys.exit(main())
