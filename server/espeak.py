"""eSpeak NG speech synthesis through its C library (ctypes), offline.

The library and its voice data come from the `espeakng-loader` wheel, so a plain
`pip install` is enough; without that package, a system `libespeak-ng` (Debian:
`apt-get install espeak-ng`) is used. The library keeps one global synthesiser, so calls are
serialised by a lock.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import threading

import numpy as np
from numpy.typing import NDArray

__all__ = ["EspeakError", "synthesize"]

AUDIO_OUTPUT_SYNCHRONOUS = 2
INITIALIZE_DONT_EXIT = 0x8000  # return errors instead of calling exit()
CHARS_UTF8 = 1
POS_CHARACTER = 1
RATE, VOLUME, PITCH = 1, 2, 3
EE_OK = 0
MIN_RATE, MAX_RATE = 80, 450  # words per minute eSpeak accepts

_Callback = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int, ctypes.c_void_p)


class _Voice(ctypes.Structure):
    _fields_ = [
        ("name", ctypes.c_char_p),
        ("languages", ctypes.c_char_p),
        ("identifier", ctypes.c_char_p),
        ("gender", ctypes.c_ubyte),
        ("age", ctypes.c_ubyte),
        ("variant", ctypes.c_ubyte),
        ("xx1", ctypes.c_ubyte),
        ("score", ctypes.c_int),
        ("spare", ctypes.c_void_p),
    ]


class EspeakError(RuntimeError):
    """eSpeak NG is missing or failed."""


class _Espeak:
    def __init__(self) -> None:
        lib, data = _load()
        self.lib = lib
        lib.espeak_Initialize.restype = ctypes.c_int
        lib.espeak_Initialize.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_char_p, ctypes.c_int]
        lib.espeak_SetSynthCallback.argtypes = [_Callback]
        lib.espeak_SetVoiceByName.argtypes = [ctypes.c_char_p]
        lib.espeak_ListVoices.argtypes = [ctypes.POINTER(_Voice)]
        lib.espeak_ListVoices.restype = ctypes.POINTER(ctypes.POINTER(_Voice))
        lib.espeak_SetParameter.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int]
        lib.espeak_Synth.argtypes = [
            ctypes.c_void_p, ctypes.c_size_t, ctypes.c_uint, ctypes.c_int, ctypes.c_uint,
            ctypes.c_uint, ctypes.c_void_p, ctypes.c_void_p,
        ]
        rate = lib.espeak_Initialize(
            AUDIO_OUTPUT_SYNCHRONOUS, 0, data.encode() if data else None, INITIALIZE_DONT_EXIT
        )
        if rate <= 0:
            raise EspeakError(f"espeak_Initialize failed ({rate}); voice data: {data or 'system default'}")
        self.sample_rate = rate
        self._chunks: list[NDArray[np.int16]] = []
        self._callback = _Callback(self._on_audio)  # kept referenced: C holds the pointer
        lib.espeak_SetSynthCallback(self._callback)

    def _on_audio(self, wav: ctypes._Pointer, n: int, _events: int) -> int:
        if n > 0 and wav:
            self._chunks.append(np.ctypeslib.as_array(wav, shape=(n,)).copy())
        return 0  # continue

    def _by_language(self, voice: str) -> str | None:
        """`en-gb+klatt` -> `gmw/en+klatt`: the library's SetVoiceByName knows voice files,
        not language codes (the espeak-ng command line looks languages up like this)."""
        lang, _, variant = voice.partition("+")
        spec = _Voice(languages=lang.lower().encode())
        found = self.lib.espeak_ListVoices(ctypes.byref(spec))
        i = 0
        while found and found[i]:
            ident = (found[i].contents.identifier or b"").decode()
            i += 1
            if ident and not ident.startswith("mb/"):  # mbrola voices need extra data
                return f"{ident}+{variant}" if variant else ident
        return None

    def _set_voice(self, voice: str) -> None:
        if self.lib.espeak_SetVoiceByName(voice.encode()) == EE_OK:
            return
        resolved = self._by_language(voice)
        if resolved is None or self.lib.espeak_SetVoiceByName(resolved.encode()) != EE_OK:
            raise ValueError(f"eSpeak NG has no voice {voice!r}")

    def say(self, text: str, voice: str, rate_wpm: int) -> NDArray[np.int16]:
        self._set_voice(voice)
        self.lib.espeak_SetParameter(RATE, rate_wpm, 0)
        data = text.encode("utf-8") + b"\0"
        self._chunks = []
        err = self.lib.espeak_Synth(data, len(data), 0, POS_CHARACTER, 0, CHARS_UTF8, None, None)
        if err != EE_OK:
            raise EspeakError(f"espeak_Synth failed ({err})")
        self.lib.espeak_Synchronize()
        out, self._chunks = self._chunks, []
        return np.concatenate(out) if out else np.zeros(0, np.int16)


def _load() -> tuple[ctypes.CDLL, str | None]:
    try:
        import espeakng_loader
    except ImportError:
        path = ctypes.util.find_library("espeak-ng")
        if path is None:
            raise EspeakError(
                "text-to-speech needs eSpeak NG: pip install espeakng-loader "
                "(or on Debian: apt-get install espeak-ng)"
            ) from None
        return ctypes.CDLL(path), None
    return ctypes.CDLL(espeakng_loader.get_library_path()), str(espeakng_loader.get_data_path())


_engine: _Espeak | None = None
_lock = threading.Lock()


def synthesize(text: str, voice: str = "en-us", rate_wpm: int = 175) -> tuple[int, NDArray[np.int16]]:
    """`(sample_rate, int16 samples)` of `text` spoken by eSpeak NG `voice` (e.g. `en-us`,
    `en-gb+f3`) at `rate_wpm` words per minute (clamped to what eSpeak accepts)."""
    global _engine
    rate_wpm = int(min(MAX_RATE, max(MIN_RATE, rate_wpm)))
    with _lock:
        if _engine is None:
            _engine = _Espeak()
        return _engine.sample_rate, _engine.say(text, voice, rate_wpm)
