"""Peak memory of preparing and iterating a local corpus: the old in-memory path against the memmap token file.

Corpora, written to a temporary folder:

* ``jsonl``: the offline King James Bible, one book per line (66 documents, 1.0 M GPT-2 tokens) at 1x, and those
  lines repeated 10 times (660 documents) at 10x. The main comparison.
* ``txt``: the same text as ONE ``.txt`` document (books joined by blank lines), at 1x for the old path (whose
  tokenizer call then encodes the whole document at once: ~600 B per token, so ~6 GB at 10x, not run on this
  shared machine) and at 10x (a 43 M-character document) for the new path, which reads and tokenizes it piece
  by piece.

Paths, each measured in a fresh subprocess (``--worker``):

* ``old``: ``tokenize_documents`` + ``split_train_heldout``, the in-memory path ``build_packed_corpus`` ran before
  the token file: one tokenizer call over the whole document, a list of Python ints, an int64 tensor per document,
  ``torch.cat``, then the blocks copied out of it. Iterated with ``iterate_batches`` on the int64 blocks.
* ``new``: ``open_training_data`` with an empty cache: the ``.txt`` file read in chunks, cut into pieces,
  tokenized one bounded call at a time into a uint16 memmap file (checksummed), then batches sliced from the map.
* ``new, cached``: ``open_training_data`` again on the cache the previous case wrote (checksum verification,
  then the same iteration).

Each worker imports the library and loads the tokenizer, records its RSS (the baseline), then resets the
kernel's high-water mark (``/proc/self/clear_refs``) before each phase: "prepare" (tokenize / open) and
"iterate" (one full epoch of ``(8, 256)`` batches). Peak RSS is ``VmHWM`` (anonymous memory *and* mapped file
pages); a sampler thread also records the largest ``RssAnon`` (heap) and ``RssFile`` (mapped files, which for the
new path include the token file's pages: page cache, reclaimable) every 5 ms.

Run: ``OMP_NUM_THREADS=1 .venv/bin/python benchmarks/data_memory.py`` (writes benchmarks/results/data_memory.md).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import markdown_table  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "data_memory.md"
SEQ_LEN = 256
BATCH = 8


# ------------------------------------------------------------------ measuring one process


def proc_status_mib() -> dict[str, float]:
    """VmHWM, VmRSS, RssAnon and RssFile of this process, in MiB."""
    text = Path("/proc/self/status").read_text()
    return {key: int(re.search(rf"^{key}:\s+(\d+) kB", text, re.M).group(1)) / 1024 for key in _KEYS}


_KEYS = ("VmHWM", "VmRSS", "RssAnon", "RssFile")


def reset_peak() -> None:
    """Reset VmHWM to the current RSS (Linux: writing 5 to /proc/self/clear_refs)."""
    Path("/proc/self/clear_refs").write_text("5")


class Sampler:
    """Largest RssAnon / RssFile seen every ``interval`` seconds while active."""

    def __init__(self, interval: float = 0.005) -> None:
        self.interval = interval
        self.peak = {"RssAnon": 0.0, "RssFile": 0.0}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Sampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()

    def _run(self) -> None:
        while not self._stop.is_set():
            self._sample()
            time.sleep(self.interval)

    def _sample(self) -> None:
        status = proc_status_mib()
        for key in self.peak:
            self.peak[key] = max(self.peak[key], status[key])


def measure(phase: Any) -> tuple[Any, dict[str, float]]:
    reset_peak()
    started = time.perf_counter()
    with Sampler() as sampler:
        result = phase()
    status = proc_status_mib()
    return result, {
        "seconds": time.perf_counter() - started,
        "peak_rss": status["VmHWM"],
        "peak_anon": sampler.peak["RssAnon"],
        "peak_file": sampler.peak["RssFile"],
    }


def worker(path: str, corpus: str, cache_dir: str) -> dict[str, Any]:
    from lowrank_train.data import iterate_batches, load_tokenizer, open_training_data
    from lowrank_train.data.corpora import iter_documents
    from lowrank_train.data.packing import split_train_heldout, tokenize_documents

    tokenizer = load_tokenizer("gpt2-offline")
    baseline = proc_status_mib()

    if path == "old":

        def prepare() -> tuple[Any, int]:
            stream = tokenize_documents(iter_documents(corpus), tokenizer)
            train, _ = split_train_heldout(stream, SEQ_LEN, 0.01)
            return train, stream.numel()

        (train, num_tokens), prepared = measure(prepare)
        steps = train.shape[0] // BATCH
        batches = iterate_batches(train, BATCH, seed=0)
    else:
        data, prepared = measure(
            lambda: open_training_data(corpus, tokenizer, seq_len=SEQ_LEN, batch_size=BATCH, cache_dir=cache_dir)
        )
        num_tokens = data.token_file.stat().st_size // 2
        steps = data.num_train_sequences // BATCH
        batches = data.train_batches()

    def iterate() -> int:
        total = 0
        for _ in range(steps):  # one full epoch: every training block is read once
            total += int(next(batches)[:, 0].sum())
        return total

    checksum, iterated = measure(iterate)
    return {"baseline": baseline, "prepare": prepared, "iterate": iterated, "tokens": num_tokens, "steps": steps,
            "checksum": checksum}  # fmt: skip


# ------------------------------------------------------------------ the driver


def write_corpus(folder: Path, kind: str, scale: int) -> Path:
    """The KJV repeated ``scale`` times: one book per ``.jsonl`` line, or one ``.txt`` document."""
    from lowrank_train.data.corpora import iter_documents

    books = list(iter_documents("kjv"))
    path = folder / f"kjv_x{scale}.{kind}"
    with path.open("w", encoding="utf-8") as out:
        if kind == "jsonl":
            for _ in range(scale):
                out.writelines(json.dumps({"text": book}) + "\n" for book in books)
        else:
            out.write("\n\n".join(books * scale))
    return path


def run_case(path: str, corpus: Path, cache_dir: Path) -> dict[str, Any]:
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    command = [sys.executable, __file__, "--worker", path, "--corpus", str(corpus), "--cache-dir", str(cache_dir)]
    done = subprocess.run(command, capture_output=True, text=True, env=env, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"worker {path} on {corpus.name} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scales", default="1,10", help="corpus sizes, multiples of KJV + Shakespeare")
    parser.add_argument("--worker", choices=["old", "new"], help=argparse.SUPPRESS)
    parser.add_argument("--corpus", help=argparse.SUPPRESS)
    parser.add_argument("--cache-dir", help=argparse.SUPPRESS)
    parser.add_argument("--no-write", action="store_true", help="print the table only")
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args.corpus, args.cache_dir)))
        return

    import torch

    cases = [  # (corpus kind, scale, label, path)
        *[(kind, scale, label, path) for kind in ["jsonl"] for scale in scales(args.scales)
          for label, path in (("old", "old"), ("new", "new"), ("new, cached", "new"))],
        ("txt", 1, "old", "old"),
        ("txt", max(scales(args.scales)), "new", "new"),
    ]  # fmt: skip
    rows, epochs = [], {}
    with tempfile.TemporaryDirectory(prefix="data_memory-") as temporary:
        folder = Path(temporary)
        for kind, scale, label, path in cases:
            corpus = folder / f"kjv_x{scale}.{kind}"
            if not corpus.exists():
                corpus = write_corpus(folder, kind, scale)
            result = run_case(path, corpus, folder / f"cache_{kind}_x{scale}")
            print(f"{kind} {scale}x {label}: {json.dumps(result)}", file=sys.stderr)
            epochs.setdefault((kind, scale), set()).add(result["checksum"])
            base = result["baseline"]["VmRSS"]
            name = f"{scale}x {kind} ({corpus.stat().st_size / 2**20:.0f} MiB, {result['tokens'] / 1e6:.1f}M tokens)"
            for phase in ("prepare", "iterate"):
                measured = result[phase]
                rows.append([
                    name, label, phase, f"{measured['seconds']:.1f}", f"{base:.0f}", f"{measured['peak_rss']:.0f}",
                    f"{measured['peak_rss'] - base:+.0f}", f"{measured['peak_anon']:.0f}",
                    f"{measured['peak_file']:.0f}",
                ])  # fmt: skip
    header = [
        "corpus", "path", "phase", "seconds", "baseline RSS", "peak RSS", "peak - baseline", "peak RssAnon",
        "peak RssFile",
    ]  # fmt: skip
    table = markdown_table(header, rows)
    print(table)
    if args.no_write:
        return
    same = all(len(checksums) == 1 for checksums in epochs.values())
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(
        "# Data: peak memory of preparing and iterating a local corpus\n\n"
        f"Measured with `OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', '1')} .venv/bin/python "
        f"benchmarks/data_memory.py` (torch {torch.__version__}, shared 2-core CPU, other jobs running, so seconds "
        "are indicative). Corpus: the offline KJV, one book per `.jsonl` line (66 documents), and those lines "
        "repeated 10 times; also the same text as one `.txt` document. GPT-2 tokenizer (offline), blocks of "
        f"{SEQ_LEN} tokens, batches of {BATCH}, one full epoch iterated. The paths gave the same epoch of batches "
        f"on each corpus: {same} (sum of the batches' first tokens).\n\n"
        "*old*: `tokenize_documents` + `split_train_heldout` (what `build_packed_corpus` ran before the token "
        "file: int64 tensors per document, `torch.cat`, blocks copied out) and `iterate_batches` on the int64 "
        "blocks. *new*: `open_training_data` with an empty cache (documents read in pieces, tokenized one bounded "
        "call at a time into a uint16 memmap file), batches sliced from the map. *new, cached*: the same on the "
        "cache the previous row wrote (checksum verified, then the same epoch).\n\n"
        "Each case runs in a fresh process. *baseline RSS*: after importing torch / transformers and loading the "
        "tokenizer. *peak RSS*: `VmHWM` of the phase (reset before it through `/proc/self/clear_refs`), anonymous "
        "memory and mapped file pages together. *peak RssAnon* / *peak RssFile*: the largest heap and mapped-file "
        "resident sizes sampled every 5 ms (for the new path RssFile includes the token file's pages, which are "
        "page cache the kernel may drop). All sizes in MiB.\n\n"
        f"{table}\n\n" + _reading(rows)
    )
    print(f"wrote {RESULTS}")


def scales(text: str) -> list[int]:
    return [int(part) for part in text.split(",")]


def _reading(rows: list[list[str]]) -> str:
    def value(corpus: str, path: str, phase: str, column: int = 6) -> float:
        for row in rows:
            if row[0].startswith(corpus) and row[1] == path and row[2] == phase:
                return float(row[column])
        return float("nan")

    lines = ["Reading the table:"]
    old = [value(f"{s}x jsonl", "old", "prepare") for s in (1, 10)]
    new = [value(f"{s}x jsonl", "new", "prepare") for s in (1, 10)]
    lines.append(
        f"- Preparing 1x -> 10x: the old path's peak above baseline goes {old[0]:+.0f} -> {old[1]:+.0f} MiB (the "
        f"whole stream as int64, twice during `torch.cat`, plus the tokenizer's encodings of a batch of 64 "
        f"documents); the new path's {new[0]:+.0f} -> {new[1]:+.0f} MiB: one tokenizer call of at most 1 Mi "
        "characters at a time, the tokens written out as they come."
    )
    old_it = [value(f"{s}x jsonl", "old", "iterate") for s in (1, 10)]
    new_it = [value(f"{s}x jsonl", "new, cached", "iterate") for s in (1, 10)]
    anon = [value(f"{s}x jsonl", "new, cached", "iterate", 7) for s in (1, 10)]
    files = [value(f"{s}x jsonl", "new, cached", "iterate", 8) for s in (1, 10)]
    lines.append(
        f"- Iterating an epoch 1x -> 10x (cached rows, fresh processes): old {old_it[0]:+.0f} -> {old_it[1]:+.0f} "
        f"MiB above baseline (every block in the heap as int64); new {new_it[0]:+.0f} -> {new_it[1]:+.0f} MiB, "
        f"its heap (RssAnon) {anon[0]:.0f} -> {anon[1]:.0f} MiB, its mapped files {files[0]:.0f} -> {files[1]:.0f} "
        "MiB: what grows is the token file's pages (2 bytes per token) mapped as the epoch reads them, i.e. "
        "file cache."
    )
    txt_old = value("1x txt", "old", "prepare")
    txt_new = value("10x txt", "new", "prepare")
    lines.append(
        f"- One `.txt` document: the old path needs {txt_old:+.0f} MiB above baseline already at 1x (the "
        f"tokenizer encodes the 4.3 M-character document in one call); the new path prepares the 10x document "
        f"(43 M characters) with {txt_new:+.0f} MiB, reading and tokenizing it in 256 Ki-character pieces."
    )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
