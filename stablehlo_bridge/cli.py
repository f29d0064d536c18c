"""``python -m stablehlo_bridge export --out DIR/model.stablehlo [--model minilm|mamba-tiny]
[--perm random|identity] ...``: export a model with a layout applied and write its
artefacts (portable artefact, MLIR text, serialised ``Exported``, JSON sidecar)."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

import numpy as np
from jax import export as jax_export

from icd_jax import corpus, permute
from stablehlo_bridge import mlir_io, models, passes, tags
from stablehlo_bridge.artifact import export_artifacts
from stablehlo_bridge.export import export
from stablehlo_bridge.mlir_io import VERSIONS


def orders(spec: permute.ModelSpec, perm: str, seed: int) -> dict[str, np.ndarray]:
    """The named-axis orders for ``--perm``: ``"random"`` (seeded) or ``"identity"``."""
    if perm == "identity":
        return permute.identity(spec)
    return permute.random_perms(spec, seed=seed)


def build(case: models.Case, perms: dict[str, np.ndarray], *, embed_params: bool = True,
          transform_meta: dict | None = None, metrics: dict | None = None
          ) -> jax_export.Exported:
    """Export ``case`` with its exported weights permuted by ``perms`` (named axes of
    ``case.spec``), tagged and verified."""
    exp = export(case.fn, case.params, *case.args, embed_params=embed_params,
                 name=case.name.replace("-", "_"))
    exp = passes.apply_permutation(exp, perms, transform_meta or {}, metrics,
                                   spec=case.spec)
    passes.verify(exp)
    return exp


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m stablehlo_bridge", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)
    e = sub.add_parser("export", help="export a model and write its artefacts")
    e.add_argument("--out", required=True, help="path of the portable artefact, "
                   "DIR/model.stablehlo (siblings .mlir, .jax, .json)")
    e.add_argument("--model", default="minilm", choices=("minilm", "mamba-tiny"))
    e.add_argument("--perm", default="random", choices=("random", "identity"))
    e.add_argument("--seed", type=int, default=0, help="seed of --perm random")
    e.add_argument("--params", default="embed", choices=("embed", "args"),
                   help="weights as tagged constants, or as tagged arguments")
    e.add_argument("--batch-size", type=int, default=4,
                   help="minilm: sentences in the exported (T, B, C) bucket")
    e.add_argument("--meta", default="{}", help="icd.transform_meta as JSON "
                   '(e.g. \'{"S": {"n": 2, "m": 4}}\')')
    e.add_argument("--metrics", default=None, help='icd.metrics as JSON ({"C": .., "Q": ..})')
    e.add_argument("--target-version", default="current",
                   help=f"StableHLO version of the artefact: {', '.join(VERSIONS)} or x.y.z")
    e.add_argument("--elide", type=int, default=None,
                   help="elide constants above this many elements in the .mlir text")
    e.add_argument("--strip-tags", action="store_true",
                   help="write the module without icd.* attributes (the sidecar keeps them)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if args.model == "minilm":
        n = args.batch_size
        case = models.minilm(models.SENTENCES[:n] if n <= len(models.SENTENCES)
                             else corpus.sentences(n))
    else:
        case = models.mamba_tiny(seed=args.seed)
    exp = build(case, orders(case.spec, args.perm, args.seed),
                embed_params=args.params == "embed", transform_meta=json.loads(args.meta),
                metrics=json.loads(args.metrics) if args.metrics else None)
    found = None  # export_artifacts reads the tags from the module
    if args.strip_tags:
        found = tags.read(mlir_io.load(exp))
        exp = passes.strip_tags(exp)
    paths = export_artifacts(exp, args.out, found, target_version=args.target_version,
                             large_elements_limit=args.elide)
    json.dump(paths, sys.stdout, indent=1)
    sys.stdout.write("\n")
    return 0
