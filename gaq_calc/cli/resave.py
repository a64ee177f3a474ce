"""gaq-resave: write model files again in the current format, with their integrity hash, changing no number.

    gaq-resave models/azobenzene_fp32/model.pt models/azobenzene_fp32/snapshot_40min.pt
    gaq-resave models/baselines/azobenzene_naive_int8.pt

A model file (gaq-train, gaq-quantize) keeps every tensor and metadata entry and gets the SHA-256 that
loading checks. An artifact (gaq-export) is rebuilt from its own tensors and metadata, without running
its code, and written again with its hash; its metadata records the rewrite under "rewritten" (prefer
gaq-export from the checkpoint where you have it). A file whose stored hash does not match is refused,
never re-stamped. Re-save only files you trust: the new hash vouches for their contents as they are.
"""

from __future__ import annotations

import argparse
import warnings
from pathlib import Path

from gaq_calc.cli import command_line, one_line_errors


@one_line_errors("gaq-resave")
def main(argv=None) -> None:
    from gaq_calc.export import is_artifact, rewrite_artifact
    from gaq_calc.model.serialization import (
        ModelFileError,
        UnverifiedModelWarning,
        content_sha256,
        read_model_file,
        write_model_file,
    )

    parser = argparse.ArgumentParser(
        prog="gaq-resave", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("files", nargs="+", help="model files and artifacts, re-saved in place")
    parser.add_argument("-o", "--out", help="write here instead (one input file only)")
    args = parser.parse_args(argv)
    if args.out and len(args.files) != 1:
        parser.error("--out takes one input file")
    command = command_line("gaq-resave", argv)
    for name in args.files:
        path = Path(name)
        out = Path(args.out) if args.out else path
        if not path.is_file():
            raise ModelFileError(f"model file not found: {path}")
        if is_artifact(path):
            digest = rewrite_artifact(path, out, {"command": command})["sha256"]
            kind = "artifact"
        else:
            with warnings.catch_warnings():  # re-saving an unverified file is how it gets its hash
                warnings.simplefilter("ignore", UnverifiedModelWarning)
                data = read_model_file(path)
            write_model_file(out, data)
            digest, kind = content_sha256(data), "model file"
        print(f"{path} -> {out} ({kind}, sha256 {digest})")


if __name__ == "__main__":
    main()
