"""``python -m stablehlo_bridge COMMAND [flags]``: the bridge from the command line.

Commands:
  export   export a model with a layout applied and write its artefacts (portable
           artefact, MLIR text, serialised ``Exported``, JSON sidecar); prints their
           paths as JSON.

    python -m stablehlo_bridge export --out DIR/model.stablehlo [--model minilm]
        [--perm random|identity] [--seed 0] [--params embed|args] [--batch-size N]
        [--meta JSON] [--metrics JSON] [--target-version current] [--elide N]
        [--strip-tags]

``--model`` is ``minilm``, ``mamba-tiny`` or a ``package.module:function`` factory
returning a ``stablehlo_bridge.models.Case`` (called with ``seed=`` and, when given,
``batch_size=``). Exit status: 0 written; 1 the export failed (the message names why);
2 bad usage (an unknown command or flag, a bad flag value, a ``--model`` that cannot be
built); flag errors print one line naming the flag, never a traceback.
"""

from __future__ import annotations

import inspect
import json
import math
import re
import sys
from collections.abc import Callable, Mapping, Sequence

import numpy as np
from absl import flags

from icd_jax import permute
from icd_jax.errors import ICDError
from stablehlo_bridge import mlir_io, models, passes, tags
from stablehlo_bridge.artifact import export_artifacts
from stablehlo_bridge.errors import BridgeError, SpecError
from stablehlo_bridge.export import build
from vsla_jax.util import underscored_flags

PROG = "python -m stablehlo_bridge"
COMMANDS = {"export": "export a model with a layout applied and write its artefacts"}
HELP_ARGS = ("-h", "-help", "--help", "--helpshort", "--helpfull", "-?")


class CheckedParser(flags.ArgumentParser):
    """A string flag whose value ``check(value)`` turns into the flag's value (a
    ``ValueError`` or ``TypeError`` from it makes an ``IllegalFlagValueError``)."""

    def __init__(self, check: Callable[[str], object], syntax: str):
        self.check = check
        self.syntactic_help = syntax

    def parse(self, argument):
        return self.check(argument) if isinstance(argument, str) else argument

    def flag_type(self) -> str:
        return self.syntactic_help


def json_object(text: str) -> dict:
    """``text`` as a JSON object (a dict); ``ValueError`` otherwise."""
    try:
        value = json.loads(text)
    except ValueError as e:
        raise ValueError(f"not valid JSON ({e})") from None
    if not isinstance(value, dict):
        raise ValueError(f"must be a JSON object, got a JSON {type(value).__name__}")
    return value


def json_numbers(text: str) -> dict[str, float]:
    """``text`` as a JSON object of numbers (``pi_hash`` is computed, so it may be
    anything); ``ValueError`` otherwise."""
    value = json_object(text)
    bad = [k for k, v in value.items() if k != "pi_hash" and (
        isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v))]
    if bad:
        raise ValueError(f"values must be finite numbers; {bad[:3]} are not")
    return value


def target_version(text: str) -> str:
    """``text`` if the bridge writes that StableHLO version (``mlir_io.version``)."""
    mlir_io.version(text)  # an ArtifactError is a ValueError
    return text


def flag_values() -> flags.FlagValues:
    """A fresh set of the ``export`` flags (absl names use underscores)."""
    fv = flags.FlagValues()
    flags.DEFINE_string("out", None, "Path of the portable artefact, DIR/model.stablehlo "
                        "(siblings .mlir, .jax, .json).", flag_values=fv)
    flags.DEFINE_string("model", "minilm", "minilm, mamba-tiny, or a "
                        "package.module:function factory returning a Case.", flag_values=fv)
    flags.DEFINE_enum("perm", "random", ["random", "identity"],
                      "Named-axis orders applied to the weights.", flag_values=fv)
    flags.DEFINE_integer("seed", 0, "Seed of --perm random (and of the model factory).",
                         lower_bound=0, flag_values=fv)
    flags.DEFINE_enum("params", "embed", ["embed", "args"],
                      "Weights as tagged constants, or as tagged arguments.", flag_values=fv)
    flags.DEFINE_integer("batch_size", None, "Batch of the exported inputs (minilm: "
                         "sentences in the (T, B, C) bucket); default: the model's.",
                         lower_bound=1, flag_values=fv)
    flags.DEFINE(CheckedParser(json_object, "a JSON object"), "meta", "{}",
                 'icd.transform_meta as a JSON object, e.g. \'{"S": {"n": 2, "m": 4}}\'.',
                 flag_values=fv)
    flags.DEFINE(CheckedParser(json_numbers, "a JSON object of numbers"), "metrics", None,
                 'icd.metrics as a JSON object of numbers, e.g. \'{"C": 1.2, "Q": 0.4}\'.',
                 flag_values=fv)
    flags.DEFINE(CheckedParser(target_version, f"{', '.join(mlir_io.VERSIONS)} or x.y.z"),
                 "target_version", "current", "StableHLO version of the artefact.",
                 flag_values=fv)
    flags.DEFINE_integer("elide", None, "Elide constants above this many elements in the "
                         ".mlir text.", lower_bound=0, flag_values=fv)
    flags.DEFINE_bool("strip_tags", False, "Write the module without icd.* attributes "
                      "(the sidecar keeps them).", flag_values=fv)
    return fv


def dashed(text: str, fv: flags.FlagValues) -> str:
    """``text`` with each flag named as users type it (``--batch-size``), also an
    unknown one (absl names it with underscores)."""
    text = re.sub(r"(Unknown command line flag ')([^']*)'",
                  lambda m: m.group(1) + m.group(2).replace("_", "-") + "'", text)
    for name in fv:
        if "_" in name:
            for pre in ("--", "--[no]"):
                text = text.replace(pre + name, pre + name.replace("_", "-"))
    return text


def usage(fv: flags.FlagValues) -> str:
    """The ``--help`` text: the commands and every flag."""
    cmds = "\n".join(f"  {k:8} {v}" for k, v in COMMANDS.items())
    lines = fv.get_help(include_special_flags=False).splitlines()
    body = "\n".join(line for line in lines if line.startswith(" "))  # no module header
    return f"usage: {PROG} COMMAND [flags]\n\ncommands:\n{cmds}\n\nflags:\n{dashed(body, fv)}\n"


def fail(message: str, status: int = 2) -> int:
    """Print one ``PROG: message`` line on stderr; return ``status``."""
    print(f"{PROG}: {' '.join(message.split())}", file=sys.stderr)
    return status


def orders(spec: permute.ModelSpec, perm: str, seed: int) -> dict[str, np.ndarray]:
    """The named-axis orders for ``--perm``: ``"random"`` (seeded) or ``"identity"``."""
    if perm == "identity":
        return permute.identity(spec)
    return permute.random_perms(spec, seed=seed)


def factory_kwargs(fv: flags.FlagValues) -> dict[str, int]:
    """The keyword arguments of the model factory: ``seed`` and, if given, ``batch_size``."""
    out = {"seed": fv.seed}
    if fv.batch_size is not None:
        out["batch_size"] = fv.batch_size
    return out


def check_factory(model: str, kwargs: Mapping[str, object]) -> None:
    """``SpecError`` unless ``model``'s factory imports and takes ``kwargs``."""
    make = models.factory(model)
    try:
        signature = inspect.signature(make)
    except (TypeError, ValueError):
        return  # no signature to check (a builtin): the call itself will tell
    try:
        signature.bind(**kwargs)
    except TypeError as e:
        raise SpecError(f"the factory of {model!r} does not take {sorted(kwargs)}: {e}"
                        ) from None


def run_export(fv: flags.FlagValues) -> dict[str, str]:
    """Build the export the flags describe and write its artefacts; their paths."""
    case = models.case(fv.model, **factory_kwargs(fv))
    exp = build(case, orders(case.spec, fv.perm, fv.seed),
                embed_params=fv.params == "embed", transform_meta=fv.meta,
                metrics=fv.metrics)
    found = None  # export_artifacts reads the tags from the module
    if fv.strip_tags:
        found = tags.read(mlir_io.load(exp))
        exp = passes.strip_tags(exp)
    return export_artifacts(exp, fv.out, found, target_version=fv.target_version,
                            large_elements_limit=fv.elide)


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``PROG`` on ``argv`` (default ``sys.argv[1:]``); the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    fv = flag_values()
    if any(a in HELP_ARGS for a in argv):
        print(usage(fv), end="")
        return 0
    try:
        rest = fv([PROG, *underscored_flags(argv)])[1:]
    except flags.Error as e:
        return fail(dashed(str(e), fv))
    if not rest:
        return fail(f"no command; choose one of {', '.join(COMMANDS)} (see --help)")
    if rest[0] not in COMMANDS or len(rest) > 1:
        return fail(f"unknown command {' '.join(rest)!r}; choose one of "
                    f"{', '.join(COMMANDS)} (see --help)")
    if not (fv.out or "").strip():
        return fail("flag --out is required: the path of the portable artefact, "
                    "DIR/model.stablehlo")
    try:
        check_factory(fv.model, factory_kwargs(fv))
    except SpecError as e:
        return fail(f"flag --model={fv.model}: {e}")
    try:
        paths = run_export(fv)
    except (BridgeError, ICDError, OSError) as e:
        return fail(f"export failed: {e}", 1)
    json.dump(paths, sys.stdout, indent=1)
    sys.stdout.write("\n")
    return 0
