"""hexgen's test support, installed as ``hexgen.testing``: daemon harness, chaos driver, namespace lab, checkpoints, ranks."""
