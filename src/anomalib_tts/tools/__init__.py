"""Study tools, not the library: the ``anomalib-tts`` command (``demo``, ``compare``), what it measures with (scores,
threshold baselines) and the synthetic datasets of the demo and the tests."""
