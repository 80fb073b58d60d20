"""The exported file's contract: its format name, where its schema sits, how to load it.

An exported file is a TorchScript archive with one extra file, ``hashrec/schema.json`` (the
feature order, dense columns, hashing fingerprints, where it came from). Loading it needs
torch and fbgemm's operators (``import fbgemm_gpu``, which ``import torchrec`` also does);
no hashrec code. ``load_exported`` is that code, kept free of hashrec imports so a server can
copy it.
"""

from __future__ import annotations

import json

import torch

FORMAT = "hashrec-serving/1"
SCHEMA_FILE = "hashrec/schema.json"


def load_exported(path: str, device: str = "cpu") -> tuple[torch.jit.ScriptModule, dict]:
    """(scripted model on ``device``, schema dict) of an exported file."""
    import fbgemm_gpu  # noqa: F401  (registers the fbgemm operators the tables use)

    extra = {SCHEMA_FILE: ""}
    module = torch.jit.load(path, map_location=device, _extra_files=extra)
    schema = json.loads(extra[SCHEMA_FILE])
    if schema.get("format") != FORMAT:
        raise ValueError(f"{path}: not a {FORMAT} file (format {schema.get('format')!r})")
    return module.eval(), schema
