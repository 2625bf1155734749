"""Speech WAV fixtures (the loader lives with the benchmarks, which use the same files)."""

from benchmarks.fixtures import FIXTURES_DIR, SPEECH_FIXTURES, load_wav, speech_spans

__all__ = ["FIXTURES_DIR", "SPEECH_FIXTURES", "load_wav", "speech_spans"]
