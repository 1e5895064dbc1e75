"""Test helpers: random sequences in each spec's layout (see pipeline/random_corpus.py)."""

from pipeline.random_corpus import corpus_rows, make_row  # noqa: F401
