"""Data shipped with lensflow, written for it: ICL tasks (icl/), parallel paragraphs (parallel/) and facts
(facts/). Installed as package data, so a wheel finds them as a checkout does."""

from pathlib import Path

DATA_DIR = Path(__file__).resolve().parent
