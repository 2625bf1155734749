"""The VAD engine's tensor work for one batch, compiled to one TorchScript call.

Why: the batch runs on the batcher's worker thread while the server's event loop holds the GIL
most of the time. Every eager torch op releases the GIL and takes it back when it returns;
with a busy loop thread each take can wait for the interpreter's switch interval (5 ms), so
the ~100 small ops of a batch (resampling, window assembly, the Silero front end, the LSTM
steps) add up: a batch that takes 14 ms alone took 30-50 ms next to a busy loop, and every
stream waited for it. A scripted module runs the whole graph in C++ and releases the GIL once
per batch. The math is `StreamingResampler.__call__` followed by `SileroVAD.forward_windows`
(the LSTM-cell path with per-stream lengths); `tests/test_vad_core.py` checks it against them.

(No `from __future__ import annotations` here: TorchScript reads the annotations.)
"""

import warnings
from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["VADBatchCore", "script_core"]

CONV_SLICE_SAMPLES = 1 << 20  # input samples per resampling conv call on CPU (4 MB of float32)
FEATURE_SLICE_WINDOWS = 1024  # windows per Silero front-end call on CPU


class VADBatchCore(nn.Module):
    """Resample (optional) -> continue each stream's pending samples -> Silero windows.

    Built from a `models.silero.SileroVAD`; holds views of its weights (same device)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.window: int = int(model.window_size)
        self.context: int = int(model.context_size)
        self.filter_length: int = int(model.filter_length)
        self.hop: int = int(model.hop_length)
        self.n_bins: int = int(model.n_bins)
        self.conv_slice: int = CONV_SLICE_SAMPLES
        self.feat_slice: int = FEATURE_SLICE_WINDOWS
        self.register_buffer("basis_t", model.forward_basis[:, 0, :].t().contiguous())
        ws: List[Tensor] = []
        bs: List[Tensor] = []
        strides: List[int] = []
        in_ch = self.n_bins
        for conv in model.encoder:
            ws.append(conv.weight.reshape(conv.out_channels, in_ch * 3).contiguous())
            bs.append(conv.bias)
            strides.append(int(conv.stride[0]))
            in_ch = conv.out_channels
        self.enc_w: List[Tensor] = ws
        self.enc_b: List[Tensor] = bs
        self.enc_stride: List[int] = strides
        rnn = model.rnn
        self.register_buffer("w_ih", rnn.weight_ih)
        self.register_buffer("w_hh", rnn.weight_hh)
        self.register_buffer("b_ih", rnn.bias_ih)
        self.register_buffer("b_hh", rnn.bias_hh)
        self.register_buffer("out_w", model.out_conv.weight[:, :, 0].contiguous())
        self.register_buffer("out_b", model.out_conv.bias)

    def features(self, x: Tensor) -> Tensor:
        """`SileroVAD.features`: x [N, context+window] -> [N, 128]."""
        x = F.pad(x.unsqueeze(1), (0, self.context), mode="reflect").squeeze(1)
        frames = x.unfold(1, self.filter_length, self.hop)
        spec = torch.matmul(frames, self.basis_t)
        re = spec[:, :, : self.n_bins]
        im = spec[:, :, self.n_bins:]
        y = torch.sqrt(re.pow(2) + im.pow(2))
        for i in range(len(self.enc_w)):
            n = y.shape[0]
            c_in = y.shape[2]
            patches = F.pad(y, (0, 0, 1, 1)).unfold(1, 3, self.enc_stride[i])
            y = F.relu(F.linear(patches.reshape(n, patches.shape[1], c_in * 3), self.enc_w[i], self.enc_b[i]))
        return y.squeeze(1)

    def windows(self, windows: Tensor, context: Tensor, h: Tensor, c: Tensor, lengths: Tensor
                ) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
        """`SileroVAD.forward_windows` with lengths: probs [B, T], h, c, new context."""
        B = windows.shape[0]
        T = windows.shape[1]
        W = self.window
        C = self.context
        signal = torch.cat([context.to(windows.dtype), windows.reshape(B, T * W)], dim=1)
        frames = signal.unfold(1, C + W, W).reshape(B * T, C + W)
        # On CPU in slices of windows: bounded scratch memory (the spectrum of 3,800 windows is
        # 16 MB) and cache-sized work (3,800 windows: 119 ms at once, 80 ms in slices of 1,024).
        n = frames.shape[0]
        step = n if frames.is_cuda else self.feat_slice
        parts: List[Tensor] = []
        for i in range(0, n, step):
            parts.append(self.features(frames[i : i + step]))
        feats = (parts[0] if len(parts) == 1 else torch.cat(parts, dim=0)).reshape(B, T, -1)
        outs: List[Tensor] = []
        for t in range(T):  # only the recurrence is sequential
            h_new, c_new = torch.lstm_cell(feats[:, t], [h, c], self.w_ih, self.w_hh, self.b_ih, self.b_hh)
            outs.append(h_new)
            keep = (lengths > t).unsqueeze(1)  # streams past their length keep their state
            h = torch.where(keep, h_new, h)
            c = torch.where(keep, c_new, c)
        hs = torch.stack(outs, dim=1).reshape(B * T, -1)
        probs = torch.sigmoid(F.linear(F.relu(hs), self.out_w, self.out_b)).reshape(B, T)
        valid = torch.arange(T, device=windows.device).unsqueeze(0) < lengths.unsqueeze(1)
        probs = torch.where(valid, probs, torch.zeros_like(probs))
        idx = lengths.unsqueeze(1) * W + torch.arange(C, device=windows.device).unsqueeze(0)
        return probs, h, c, torch.gather(signal, 1, idx)

    def forward(self, x: Tensor, scale: float, hist: Optional[Tensor], rs_weight: Optional[Tensor],
                down: int, pending: Tensor, pending_len: Tensor, n_windows: Tensor, t_max: int,
                ctx: Tensor, h: Tensor, c: Tensor, in_len: Optional[Tensor] = None
                ) -> Tuple[Tensor, Optional[Tensor], Tensor, Tensor, Tensor, Tensor]:
        """One batch. x [B, n] int16 (scaled by `scale`) or float32 samples at the streams'
        rate; hist/rs_weight: the resampler's per-stream history and polyphase kernel (None: x
        is at 16 kHz already); pending [B, window] with pending_len [B] valid samples;
        n_windows [B] windows each stream completes (t_max their max); ctx, h, c: state.
        in_len [B]: each row's own length when rows are zero-padded to n (None: all n). The
        padding changes nothing a stream keeps: the resampler is causal (a row's first
        in_len*up/down outputs see only its own samples), only `n_windows` windows run per
        stream, the pending tail's valid part ends where the stream's output does, and the
        history is taken at each row's own end.
        Returns (probs [B, t_max], new hist, new pending, h, c, ctx)."""
        x = x.to(torch.float32)
        if scale != 1.0:
            x = x * scale
        new_hist: Optional[Tensor] = None
        y = x
        if hist is not None and rs_weight is not None:
            b = x.shape[0]
            buf = torch.cat([hist, x], dim=1)
            # On CPU, in slices of rows that fit in cache: one conv over 100 streams of 0.6 s
            # at 48 kHz (11 MB) took 55 ms on a 2-core Xeon, 32 rows at a time 15 ms in all.
            rows = b if buf.is_cuda else max(1, self.conv_slice // buf.shape[1])
            outs: List[Tensor] = []
            for i in range(0, b, rows):
                outs.append(F.conv1d(buf[i : i + rows].unsqueeze(1), rs_weight, stride=down))
            out = outs[0] if len(outs) == 1 else torch.cat(outs, dim=0)
            y = out.transpose(1, 2).reshape(b, -1)
            if in_len is None:
                new_hist = buf[:, buf.shape[1] - hist.shape[1]:].clone()
            else:  # the last H samples of [hist | x[:in_len]]
                at = in_len.unsqueeze(1) + torch.arange(hist.shape[1], device=buf.device).unsqueeze(0)
                new_hist = buf.gather(1, at)
        b = y.shape[0]
        m = y.shape[1]
        W = self.window
        p = pending_len.unsqueeze(1)
        # Per stream the sample sequence is pending[:p] followed by y: one gather builds it.
        buf2 = torch.cat([pending, y], dim=1)
        j = torch.arange((t_max + 1) * W, device=y.device).unsqueeze(0)
        src = torch.where(j < p, j, j - p + W).clamp(max=W + m - 1)
        seq = buf2.gather(1, src.expand(b, -1))
        if t_max > 0:
            probs, h, c, ctx = self.windows(seq[:, : t_max * W].reshape(b, t_max, W), ctx, h, c, n_windows)
        else:
            probs = y.new_zeros(b, 0)
        keep = n_windows.unsqueeze(1) * W + torch.arange(W, device=y.device).unsqueeze(0)
        return probs, new_hist, seq.gather(1, keep), h, c, ctx


def script_core(model: nn.Module) -> torch.jit.ScriptModule:
    """`VADBatchCore(model)` compiled with TorchScript (its deprecation warning silenced: there
    is no other way in torch to run a graph of eager-sized CPU ops without the GIL that needs
    no compiler at run time; `torch.compile` on CPU needs a C++ toolchain)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", FutureWarning)
        return torch.jit.script(VADBatchCore(model).eval())
