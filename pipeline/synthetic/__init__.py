"""The embedded default's synthetic AR-TTS task: the corpus law (``law``: the prefix decides every
phoneme start), its exact transcriber (``transcribe``), random rows in each model's layout
(``random_corpus``) and the trained mini teachers (``teachers``)."""
