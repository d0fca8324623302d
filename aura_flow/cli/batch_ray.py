"""The ``batch`` command's ``--backend ray`` flags (`aura_flow.batch.ray`); Ray itself is imported only when the
backend is chosen."""
from __future__ import annotations

# the model flags of --backend local are the workers' too (the files on storage every node can read)
MODEL_DESTS = ("checkpoint", "tokenizer", "text_encoder", "vae", "dtype", "device", "speed", "noise_device")
DESTS = MODEL_DESTS + ("ray_address", "workers", "gpus_per_worker", "collect")


def add_flags(p) -> None:
    g = p.add_argument_group("--backend ray", "Ray worker actors, each loading the model once (pip install "
                                              "\".[ray]\"); the model flags above apply, the files on storage "
                                              "every node can read")
    g.add_argument("--ray-address", default="local", metavar="ADDRESS",
                   help="local: start Ray in this process on this machine; auto: join the cluster this machine "
                        "belongs to (ray start); or ray://HOST:PORT")
    g.add_argument("--workers", type=int, default=None, metavar="N",
                   help="worker actors (default: one per GPU, or one per node without GPUs)")
    g.add_argument("--gpus-per-worker", type=float, default=None, metavar="G",
                   help="GPUs per worker (default: 1 where Ray sees GPUs, else 0: CPU workers)")
    g.add_argument("--collect", action="store_true",
                   help="the workers send the images back and this process writes them (an --out folder the "
                        "workers cannot see); by default they write into --out themselves")
