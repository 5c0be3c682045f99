"""``ckptsel cache``: what the cache folder holds (the result store, converted copies of checkpoints);
clearing the copies."""

from __future__ import annotations

from pathlib import Path

import click

from ckptsel.cli.options import json_option, print_json, stdout_console


def human_bytes(n: int) -> str:
    """1536 -> '1.5 KiB': disk sizes at a glance."""
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} TiB"


@click.command("cache")
@click.option("--cache-dir", type=click.Path(file_okay=False, path_type=Path), envvar="CKPTSEL_CACHE",
              help="The cache folder [env CKPTSEL_CACHE; default: the user cache dir].")
@click.option("--clear", "clear_copies", is_flag=True,
              help="Remove the converted copies (made again from the checkpoints when next needed). "
                   "The result store is kept.")
@json_option
def cache(cache_dir, clear_copies, as_json):
    """Show what the cache folder holds: the result store and the converted copies of checkpoints.

    Checkpoints that transformers cannot read as they lie (FSDP sharded or full-state, DeepSpeed
    ZeRO) are converted once into a safetensors model folder in the cache, keyed by their content
    fingerprint, and every later command reads that copy. They can be large (the fp32 weights);
    --clear removes them.

    \b
    Example:
      ckptsel cache
      ckptsel cache --clear --cache-dir /scratch/ckptsel
    """
    from ckptsel.formats.converted import clear, converted_root, default_cache_dir, usage
    from ckptsel.store import STORE_FILENAME

    folder = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    store = folder / STORE_FILENAME
    store_bytes = sum(p.stat().st_size for p in folder.glob(f"{STORE_FILENAME}*") if p.is_file())
    copies = usage(folder)
    removed = freed = 0
    if clear_copies:
        removed, freed = clear(folder)
        copies = usage(folder)  # what is left: copies being written by a running conversion
    out = {
        "cache_dir": str(folder),
        "store": {"path": str(store), "bytes": store_bytes},
        "converted": {"path": str(converted_root(folder)), "copies": sum(not c.partial for c in copies),
                      "partial": sum(c.partial for c in copies), "bytes": sum(c.bytes for c in copies),
                      "items": [c.to_dict() for c in copies]},
    }
    if clear_copies:
        out["cleared"] = {"copies": removed, "bytes": freed}
    if as_json:
        print_json(out)
        return
    console = stdout_console()
    console.print(f"cache folder {folder}")
    console.print(f"  result store      {human_bytes(store_bytes)}" + ("" if store.is_file() else " (none yet)"))
    conv = out["converted"]
    partial = f", {conv['partial']} partial" if conv["partial"] else ""
    console.print(f"  converted copies  {conv['copies']}{partial}, {human_bytes(conv['bytes'])}")
    for c in copies:
        what = "partial (a conversion running or killed)" if c.partial else f"{c.format or '?'} from {c.source or '?'}"
        console.print(f"    {c.path.name[:12]}  {human_bytes(c.bytes):>10}  {what}", soft_wrap=True)
    if clear_copies:
        console.print(f"cleared {removed} converted cop{'y' if removed == 1 else 'ies'}, {human_bytes(freed)} freed")
