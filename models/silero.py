"""Silero VAD re-expressed as a plain ``nn.Module`` with explicit state.

The reference TorchScript model (``silero_vad.jit`` in the silero-vad wheel) keeps its LSTM
state and audio context inside the module, which makes it one-stream-per-instance. Here the
state travels in and out as tensors, so one instance serves a whole batch of independent
streams whose state lives in a slot table on the device.

Graph (read from ``m._model.code`` / ``.stft.code`` / ``.encoder.code`` / ``.decoder.code``):

    x [B, ctx+win] -> reflect-pad right by ctx -> conv1d(forward_basis, stride=hop)
      -> magnitude sqrt(re^2 + im^2) over filter_length//2+1 bins   (4 frames)
      -> 4 x (conv1d k=3 pad=1, strides 1,2,2,1 + ReLU)              ([B, 128, 1])
      -> LSTMCell(128, 128) -> ReLU -> conv1d 1x1 (128->1) -> sigmoid -> mean over time

Weights come from the TorchScript ``state_dict()`` (``_model.*`` for 16 kHz, ``_model_8k.*``
for 8 kHz). The wheel's ``silero_vad_16k.safetensors`` holds different weights that do not
reproduce the TorchScript outputs, so it is deliberately not used.
"""
from __future__ import annotations

import importlib.util
import os
import warnings

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["SileroVAD"]

# sample_rate -> (window, context, stft filter_length, stft hop, TorchScript submodule prefix)
_CONFIGS: dict[int, tuple[int, int, int, int, str]] = {
    16000: (512, 64, 256, 128, "_model."),
    8000: (256, 32, 128, 64, "_model_8k."),
}
_ENCODER_STRIDES = (1, 2, 2, 1)
_ENCODER_CHANNELS = (128, 64, 64, 128)  # output channels of each encoder conv
HIDDEN = 128


def _package_jit_path() -> str:
    # find_spec locates the installed package without importing it (its __init__ pulls in
    # utils we do not need); the .jit file ships in silero_vad/data, so nothing is downloaded.
    spec = importlib.util.find_spec("silero_vad")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("silero-vad is not installed")
    path = os.path.join(list(spec.submodule_search_locations)[0], "data", "silero_vad.jit")
    if not os.path.isfile(path):
        raise FileNotFoundError(path)
    return path


class SileroVAD(nn.Module):
    """Stateless-module Silero VAD for one sample rate (16000 or 8000)."""

    window_size: int
    context_size: int
    sample_rate: int

    def __init__(self, sample_rate: int = 16000) -> None:
        super().__init__()
        if sample_rate not in _CONFIGS:
            raise ValueError(f"sample_rate must be one of {sorted(_CONFIGS)}, got {sample_rate}")
        window, context, filter_length, hop, _ = _CONFIGS[sample_rate]
        self.sample_rate = sample_rate
        self.window_size = window
        self.context_size = context
        self.filter_length = filter_length
        self.hop_length = hop
        self.n_bins = filter_length // 2 + 1
        # STFT as a conv: rows [0, n_bins) are the real part, [n_bins, 2*n_bins) the imaginary.
        self.register_buffer("forward_basis", torch.zeros(2 * self.n_bins, 1, filter_length))
        convs = []
        in_ch = self.n_bins
        for out_ch, stride in zip(_ENCODER_CHANNELS, _ENCODER_STRIDES):
            convs.append(nn.Conv1d(in_ch, out_ch, kernel_size=3, stride=stride, padding=1))
            in_ch = out_ch
        self.encoder = nn.ModuleList(convs)
        self.rnn = nn.LSTMCell(HIDDEN, HIDDEN)
        self.out_conv = nn.Conv1d(HIDDEN, 1, kernel_size=1)

    # ------------------------------------------------------------------ loading
    @classmethod
    def from_torchscript(cls, jit_model: torch.nn.Module, sample_rate: int = 16000,
                         device: torch.device | str | None = None) -> "SileroVAD":
        """Build from an already loaded TorchScript Silero model (``load_silero_vad()``)."""
        prefix = _CONFIGS[sample_rate][4]
        sd = {k[len(prefix):]: v for k, v in jit_model.state_dict().items() if k.startswith(prefix)}
        mapped = {"forward_basis": sd["stft.forward_basis_buffer"]}
        for i in range(len(_ENCODER_STRIDES)):
            mapped[f"encoder.{i}.weight"] = sd[f"encoder.{i}.reparam_conv.weight"]
            mapped[f"encoder.{i}.bias"] = sd[f"encoder.{i}.reparam_conv.bias"]
        for name in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"):
            mapped[f"rnn.{name}"] = sd[f"decoder.rnn.{name}"]
        mapped["out_conv.weight"] = sd["decoder.decoder.2.weight"]
        mapped["out_conv.bias"] = sd["decoder.decoder.2.bias"]
        model = cls(sample_rate)
        model.load_state_dict({k: v.detach().clone().float() for k, v in mapped.items()}, strict=True)
        model.eval().requires_grad_(False)
        if device is not None:
            model.to(device)
        return model

    @classmethod
    def from_package(cls, sample_rate: int = 16000,
                     device: torch.device | str | None = None) -> "SileroVAD":
        """Weights from the installed silero-vad wheel's TorchScript model (no download)."""
        with warnings.catch_warnings():
            # torch.jit.load is deprecated in recent torch; it is only our weight reader here.
            warnings.simplefilter("ignore", DeprecationWarning)
            jit_model = torch.jit.load(_package_jit_path(), map_location="cpu")
        return cls.from_torchscript(jit_model, sample_rate, device)

    # ------------------------------------------------------------------ pieces
    def new_state(self, batch_size: int, device: torch.device | str | None = None
                  ) -> tuple[Tensor, Tensor, Tensor]:
        """Zero (h, c, context), the state the reference model starts from after reset_states()."""
        dev = device if device is not None else self.forward_basis.device
        h = torch.zeros(batch_size, HIDDEN, device=dev)
        c = torch.zeros(batch_size, HIDDEN, device=dev)
        ctx = torch.zeros(batch_size, self.context_size, device=dev)
        return h, c, ctx

    # The convolutions are written as unfold + matmul (channels-last) rather than F.conv1d:
    # cuDNN convolutions run in TF32 by default on Ampere+ GPUs (torch.backends.cudnn.allow_tf32
    # is True), which moves the probabilities by ~2e-3 vs the float32 reference, whereas
    # float32 matmuls stay IEEE unless the process opts in with
    # torch.set_float32_matmul_precision("high"). Toggling the global cuDNN flag from inside
    # a model would race with other threads, so the model avoids cuDNN instead.
    def features(self, x: Tensor) -> Tensor:
        """Stateless front end: x [N, context+window] -> encoder output [N, 128]."""
        x = F.pad(x.unsqueeze(1), (0, self.context_size), mode="reflect").squeeze(1)
        frames = x.unfold(1, self.filter_length, self.hop_length)  # [N, 4, filter_length]
        spec = torch.matmul(frames, self.forward_basis[:, 0, :].t())  # [N, 4, 2*n_bins]
        re = spec[..., : self.n_bins]
        im = spec[..., self.n_bins:]
        y = torch.sqrt(re.pow(2) + im.pow(2))  # [N, L, C]
        for conv in self.encoder:  # conv1d(k=3, pad=1, stride s) + ReLU, as im2col @ W
            n, _, c_in = y.shape
            patches = F.pad(y, (0, 0, 1, 1)).unfold(1, 3, conv.stride[0])  # [N, L', C, 3]
            w = conv.weight.reshape(conv.out_channels, c_in * 3)  # (C, k) order matches
            y = F.relu(F.linear(patches.reshape(n, patches.shape[1], c_in * 3), w, conv.bias))
        return y.squeeze(1)  # the encoder reduces 4 STFT frames to exactly 1

    def decode(self, h: Tensor) -> Tensor:
        """h [N, 128] -> speech probability [N] (ReLU, 1x1 conv, sigmoid; mean over 1 step)."""
        y = F.linear(F.relu(h), self.out_conv.weight[:, :, 0], self.out_conv.bias)  # [N, 1]
        return torch.sigmoid(y).squeeze(1)

    # ------------------------------------------------------------------ forward
    def forward(self, x: Tensor, h: Tensor, c: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """One window per stream.

        x: [B, context_size + window_size] float32 (previous context, then the new window),
        h, c: [B, 128]. Returns (prob [B], h [B, 128], c [B, 128]).
        """
        expected = self.context_size + self.window_size
        if x.dim() != 2 or x.shape[-1] != expected:
            raise ValueError(f"x must be [B, {expected}], got {tuple(x.shape)}")
        feat = self.features(x)
        h, c = self.rnn(feat, (h, c))
        return self.decode(h), h, c

    def forward_windows(self, windows: Tensor, context: Tensor, h: Tensor, c: Tensor,
                        lengths: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Several consecutive windows per stream, ragged via ``lengths``.

        windows: [B, T, window_size]; context: [B, context_size] (the samples just before
        windows[:, 0]); h, c: [B, 128]; lengths: [B] int, valid windows per stream (<= T),
        None = all T. Returns (probs [B, T] with 0 where t >= lengths[b], h, c, new context).
        A stream with lengths[b] == 0 gets its h, c and context back bit-for-bit unchanged.
        """
        B, T, W = windows.shape
        C = self.context_size
        if W != self.window_size:
            raise ValueError(f"windows must be [B, T, {self.window_size}], got {tuple(windows.shape)}")
        if context.shape != (B, C):
            raise ValueError(f"context must be [{B}, {C}], got {tuple(context.shape)}")

        # Each model input is (C samples before the window, window): overlapping frames of
        # the contiguous [context | windows...] signal, taken as a view with unfold.
        signal = torch.cat([context.to(windows.dtype), windows.reshape(B, T * W)], dim=1)
        if T == 0:
            return windows.new_zeros(B, 0), h, c, context
        frames = signal.unfold(1, C + W, W)  # [B, T, C+W]
        # Stateless front end on all B*T windows in one call.
        feats = self.features(frames.reshape(B * T, C + W)).reshape(B, T, HIDDEN)

        if lengths is not None:
            lengths = lengths.to(device=windows.device, dtype=torch.long)
        if windows.device.type == "cpu" and T > 1:
            return self._windows_packed(feats, signal, h, c, lengths)
        outs = []
        for t in range(T):  # only the recurrence is sequential
            h_new, c_new = self.rnn(feats[:, t], (h, c))
            outs.append(h_new)
            if lengths is None:
                h, c = h_new, c_new
            else:
                # Streams past their length keep their state exactly (torch.where copies bits).
                keep = (lengths > t).unsqueeze(1)
                h = torch.where(keep, h_new, h)
                c = torch.where(keep, c_new, c)
        probs = self.decode(torch.stack(outs, dim=1).reshape(B * T, HIDDEN)).reshape(B, T)

        if lengths is None:
            new_context = signal[:, T * W:]  # last C samples of the last window
        else:
            valid = torch.arange(T, device=windows.device).unsqueeze(0) < lengths.unsqueeze(1)
            probs = torch.where(valid, probs, torch.zeros_like(probs))
            # Stream b's last valid window ends at signal index C + L*W, so its last C samples
            # start at L*W; L == 0 picks the incoming context itself.
            idx = lengths.unsqueeze(1) * W + torch.arange(C, device=windows.device).unsqueeze(0)
            new_context = torch.gather(signal, 1, idx)
        return probs, h, c, new_context

    def _windows_packed(self, feats: Tensor, signal: Tensor, h: Tensor, c: Tensor,
                        lengths: Tensor | None) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """CPU path of `forward_windows`: the whole ragged recurrence as ONE packed LSTM call
        (same weights and gate math as the LSTMCell loop) instead of ~5 small ops per window:
        fewer ops, fewer GIL round trips for eager callers. (The server's engine runs the
        whole batch as one TorchScript call instead: `models/vad_core.py`.) (CUDA keeps the cell loop: cuDNN's
        RNN may use TF32, which would break the 1e-4 agreement with the reference model.)"""
        B, T, _ = feats.shape
        W, C = self.window_size, self.context_size
        lens = torch.full((B,), T, dtype=torch.long) if lengths is None else lengths.cpu()
        active = (lens > 0).nonzero().squeeze(1)
        probs = feats.new_zeros(B, T)
        h_out, c_out = h.clone(), c.clone()
        if active.numel():
            packed = torch.nn.utils.rnn.pack_padded_sequence(
                feats[active], lens[active], batch_first=True, enforce_sorted=False
            )
            order = packed.sorted_indices
            rnn = self.rnn
            out, hn, cn = torch._VF.lstm(
                packed.data, packed.batch_sizes,
                (h[active][order].unsqueeze(0), c[active][order].unsqueeze(0)),
                [rnn.weight_ih, rnn.weight_hh, rnn.bias_ih, rnn.bias_hh],
                True, 1, 0.0, False, False,
            )
            unsort = packed.unsorted_indices
            h_out[active] = hn[0][unsort]
            c_out[active] = cn[0][unsort]
            padded, _ = torch.nn.utils.rnn.pad_packed_sequence(
                torch.nn.utils.rnn.PackedSequence(out, packed.batch_sizes, order, unsort),
                batch_first=True, total_length=T,
            )
            p = self.decode(padded.reshape(-1, HIDDEN)).reshape(-1, T)
            valid = torch.arange(T).unsqueeze(0) < lens[active].unsqueeze(1)
            probs[active] = torch.where(valid, p, torch.zeros_like(p))
        idx = lens.unsqueeze(1) * W + torch.arange(C).unsqueeze(0)
        return probs, h_out, c_out, torch.gather(signal, 1, idx)
