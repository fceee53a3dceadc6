"""lm-eval task definitions shipped with the package (always on lm-eval's include path; see ``zero_shot.py``)."""

from pathlib import Path

TASK_DIR = Path(__file__).resolve().parent
