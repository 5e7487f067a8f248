"""Where a named dataset comes from: local folders, offline mirrors, the cache, or a download.

A BEIR dataset is named the way researchers name it (``beir/scifact``, or ``scifact``) and resolved to a
local BEIR folder (``corpus.jsonl[.gz]``, ``queries.jsonl[.gz]``, ``qrels/<split>.tsv``) in this order:

1. an explicit local folder: the name is the path of a folder that exists;
2. the data root given by config (``data_root``) or by ``$SEARCH_R3_DATA``: ``<root>/beir/scifact``;
3. the offline mirrors in ``$SEARCH_R3_MIRRORS`` (``os.pathsep``-separated; default ``../shared/data``,
   relative to the working directory; empty: none), where present;
4. the cache: ``$SEARCH_R3_CACHE`` or ``~/.cache/search_r3/data``: ``<cache>/beir/scifact``;
5. a download into the cache: BEIR's official zip ``{base}/{name}.zip`` (the location
   ``beir.util.download_and_unzip`` uses; ``$SEARCH_R3_BEIR_MIRROR`` replaces the base), verified against
   BEIR's published md5 (a mirror's own ``MD5SUMS`` file where it has one), fetched once.

``hf:<org>/<name>`` (``hf:BeIR/scifact`` with its ``-qrels`` companion, ``hf:mteb/scifact``) streams the
Hugging Face dataset's files with ``datasets`` (``streaming=True``: a corpus is never held in memory) into
the same BEIR layout in the cache, once; ``$SEARCH_R3_HF_MIRROR`` names a local folder laid out like the
hub (``<mirror>/<org>/<name>/...``) to read instead. Row *n* of a streamed split is line *n* of its cache
file, so every file:line message of :mod:`search_r3.datamodules.beir_files` applies to every source.

Downloads and conversions write into a temporary name beside their target and rename it into place, under
a file lock, so a killed run leaves no half dataset and concurrent ranks fetch once. With no copy anywhere
and no network, one :class:`DataSourceError` names the dataset, every place looked, the cache and how to
place the files by hand.
"""

from __future__ import annotations

import gzip
import json
import logging
import os
import shutil
import zipfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from filelock import FileLock

from search_r3.datamodules.beir_files import DataFormatError

log = logging.getLogger(__name__)

BEIR_BASE_URL = "https://public.ukp.informatik.tu-darmstadt.de/thakur/BEIR/datasets"
# md5 of each official zip as BEIR's README publishes it (the public ones).
BEIR_MD5 = {
    "msmarco": "444067daf65d982533ea17ebd59501e4",
    "trec-covid": "ce62140cb23feb9becf6270d0d1fe6d1",
    "nfcorpus": "a89dba18a62ef92f7d323ec890a0d38d",
    "nq": "d4d3d2e48787a744b6f6e691ff534307",
    "hotpotqa": "f412724f78b0d91183a0e86805e16114",
    "fiqa": "17918ed23cd04fb15047f73e6c3bd9d9",
    "arguana": "8ad3e3c2a5867cdced806d6503f29b99",
    "webis-touche2020": "46f650ba5a527fc69e0a6521c5a23563",
    "cqadupstack": "4e41456d7df8ee7760a7f866133bda78",
    "quora": "18fb154900ba42a600f84b839c173167",
    "dbpedia-entity": "c2a39eb420a3164af735795df012ac2c",
    "scidocs": "38121350fc3a4d2f48850f6aff52e4a9",
    "fever": "5a818580227bfb4b35bb6fa46d9b6c03",
    "climate-fever": "8b66f0a9126c521bae2bde127b4dc99d",
    "scifact": "5f7d1de60b170fc8027bb7898e2efca1",
}
ENV_DATA = "SEARCH_R3_DATA"
ENV_MIRRORS = "SEARCH_R3_MIRRORS"
ENV_CACHE = "SEARCH_R3_CACHE"
ENV_BEIR_MIRROR = "SEARCH_R3_BEIR_MIRROR"
ENV_HF_MIRROR = "SEARCH_R3_HF_MIRROR"
ENV_MKQA_MIRROR = "SEARCH_R3_MKQA_MIRROR"
MKQA_BASE_URL = "https://github.com/apple/ml-mkqa/raw/main/dataset"  # the release's dataset/mkqa.jsonl.gz
DEFAULT_MIRRORS = "../shared/data"
HF_PREFIX = "hf:"


class DataSourceError(DataFormatError):
    """A dataset that is nowhere to be found or could not be fetched; the message lists every place looked."""


def cache_dir() -> Path:
    """The data cache: ``$SEARCH_R3_CACHE`` or ``~/.cache/search_r3/data``."""
    return Path(os.environ.get(ENV_CACHE) or Path.home() / ".cache" / "search_r3" / "data").expanduser()


def data_roots(data_root: str | Path | None) -> list[tuple[str, Path]]:
    """(label, folder) of the local roots searched, in order: the given root (or ``$SEARCH_R3_DATA``),
    then the offline mirrors that exist."""
    roots: list[tuple[str, Path]] = []
    given = data_root if data_root not in (None, "") else os.environ.get(ENV_DATA)
    if given:
        root = Path(given).expanduser()
        if not root.is_dir():
            origin = "data_root" if data_root not in (None, "") else f"${ENV_DATA}"
            raise DataSourceError(f"data root {root} (resolved: {root.resolve()}, from {origin}) does not exist; "
                                  "pass --data.init_args.data_root with the folder holding the datasets, or leave it "
                                  "unset to use the mirrors, the cache and downloads")
        roots.append(("data root", root))
    for entry in os.environ.get(ENV_MIRRORS, DEFAULT_MIRRORS).split(os.pathsep):
        if entry and Path(entry).expanduser().is_dir():
            roots.append(("offline mirror", Path(entry).expanduser()))
    return roots


def is_beir_folder(folder: Path) -> bool:
    return folder.is_dir() and any((folder / f"corpus.jsonl{z}").is_file() for z in ("", ".gz"))


@dataclass(frozen=True)
class DatasetName:
    """A parsed dataset name: ``beir/scifact`` -> collection ``beir``, name ``scifact``."""

    spec: str

    @property
    def is_hf(self) -> bool:
        return self.spec.startswith(HF_PREFIX)

    @property
    def name(self) -> str:
        """The dataset's short name (``scifact``), which names its task and rows."""
        return self.spec.rstrip("/").split("/")[-1]

    @property
    def relative(self) -> str:
        """Where it sits under a data root: ``beir/scifact`` as written (``scifact`` stays ``scifact``)."""
        return self.spec.strip("/")


def resolve_beir(spec: str, data_root: str | Path | None = None, split: str | None = None) -> Path:
    """The local BEIR folder of dataset ``spec`` (see the module doc for the order); downloads into the
    cache if no copy exists. ``split``: the qrels a Hugging Face source must provide."""
    ref = DatasetName(spec)
    if ref.is_hf:
        return HFBeirSource(spec[len(HF_PREFIX):]).materialise(split)
    explicit = Path(spec).expanduser()
    if explicit.is_dir():
        return explicit
    if spec.startswith(("/", ".", "~")):
        raise DataSourceError(f"dataset folder {explicit} (resolved: {explicit.resolve()}) does not exist")
    looked: list[str] = []
    for label, root in data_roots(data_root):
        # a bare name (``scifact``) is also looked for where BEIR sets usually sit (``beir/scifact``)
        for candidate in dict.fromkeys([root / ref.relative, root / "beir" / ref.name]):
            if candidate.is_dir():
                return candidate
            looked.append(f"{candidate} ({label})")
    cached = cache_dir() / "beir" / ref.name
    if is_beir_folder(cached):
        return cached
    looked.append(f"{cached} (cache)")
    return BeirZipSource(ref.name).fetch(cached, looked)


def resolve_mkqa(source: str, data_root: str | Path | None = None) -> Path:
    """The MKQA release file: ``source`` if it is a file; for ``mkqa``, ``mkqa/mkqa.jsonl.gz`` under the
    local roots, then the cache, then a download of the release (``$SEARCH_R3_MKQA_MIRROR`` replaces its
    base; verified by a mirror's ``MD5SUMS`` where it has one, as the release publishes no checksum)."""
    given = Path(source).expanduser()
    if given.is_file():
        return given
    if source != "mkqa":
        raise DataSourceError(f"MKQA file {source} (resolved: {given.resolve()}) does not exist; use 'mkqa' for the "
                              "release (found locally, cached or downloaded), 'hf:mteb/MKQARetrieval', or a file path")
    looked = []
    for label, root in data_roots(data_root):
        candidate = root / "mkqa" / "mkqa.jsonl.gz"
        if candidate.is_file():
            return candidate
        looked.append(f"{candidate} ({label})")
    cached = cache_dir() / "mkqa" / "mkqa.jsonl.gz"
    if cached.is_file():
        return cached
    looked.append(f"{cached} (cache)")
    mirror = os.environ.get(ENV_MKQA_MIRROR, "").rstrip("/")
    base = mirror or MKQA_BASE_URL
    cached.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(cached) + ".lock"):
        if not cached.is_file():
            path = download_once(f"{base}/mkqa.jsonl.gz", "mkqa.jsonl.gz", mirror_md5(base, "mkqa.jsonl.gz") if mirror
                                 else None, "mkqa", looked)
            os.replace(path, cached)
    return cached


class BeirZipSource:
    """BEIR's per-dataset zip, from the official base or ``$SEARCH_R3_BEIR_MIRROR``, unzipped into the cache.

    pooch downloads (once, into a temporary file renamed when complete and verified); we unzip into a
    temporary folder renamed into place, so neither a cut download nor a killed unzip leaves a dataset
    that looks complete."""

    def __init__(self, name: str) -> None:
        self.name = name
        mirror = os.environ.get(ENV_BEIR_MIRROR, "").rstrip("/")
        self.base = mirror or BEIR_BASE_URL
        self.url = f"{self.base}/{name}.zip"
        self.mirrored = bool(mirror)

    def fetch(self, dest: Path, looked: list[str]) -> Path:
        dest.parent.mkdir(parents=True, exist_ok=True)
        with FileLock(str(dest.parent / f".{self.name}.lock")):
            if is_beir_folder(dest):  # another process fetched it while we waited
                return dest
            md5 = mirror_md5(self.base, f"{self.name}.zip") if self.mirrored else BEIR_MD5.get(self.name)
            zip_path = download_once(self.url, f"{self.name}.zip", md5, self.name, looked)
            try:
                unzip_beir(zip_path, dest, self.name)
            finally:
                zip_path.unlink(missing_ok=True)
        return dest


def mirror_md5(base: str, filename: str) -> str | None:
    """A mirror's md5 of ``filename`` from its ``MD5SUMS`` file (``md5sum`` output), if it has one: a
    mirror may repack what it serves, so an official checksum cannot be assumed for it."""
    import requests

    try:
        response = requests.get(f"{base}/MD5SUMS", timeout=30)
    except requests.RequestException:
        return None
    if response.status_code != 200:
        return None
    for line in response.text.splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[1].lstrip("*") == filename:
            return parts[0].lower()
    return None


def download_once(url: str, filename: str, md5: str | None, name: str, looked: list[str]) -> Path:
    """``url`` into ``<cache>/downloads/<filename>`` with pooch: once, into a temporary file renamed when
    complete and verified (md5 where known). A refused checksum or a failed download leaves nothing."""
    import pooch
    import requests

    if md5 is None:
        log.warning("no checksum known for %s: the download is not verified", url)
    pooch.get_logger().setLevel(logging.WARNING)  # our own lines say what is fetched; pooch's suggest code edits
    log.info("downloading %s", url)
    try:
        return Path(pooch.retrieve(url, known_hash=f"md5:{md5}" if md5 else None, fname=filename,
                                   path=cache_dir() / "downloads", progressbar=True))
    except ValueError as err:  # pooch: the hash does not match
        raise DataSourceError(f"{url}: checksum mismatch, the download was refused and deleted ({_short(err)}); "
                              f"expected md5 {md5}") from err
    except (requests.RequestException, OSError) as err:
        raise DataSourceError(not_found_message(name, looked, f"download of {url} failed "
                                                f"({type(err).__name__}: {_short(err)})")) from err


def unzip_beir(zip_path: Path, dest: Path, name: str) -> None:
    """Unzip a BEIR zip (``<name>/corpus.jsonl`` ...) to ``dest`` through a temporary folder renamed
    into place."""
    tmp = dest.parent / f".{name}.partial-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        with zipfile.ZipFile(zip_path) as zf:
            zf.extractall(tmp)  # zipfile drops absolute paths and '..' from member names
        inner = tmp / name if is_beir_folder(tmp / name) else tmp
        if not is_beir_folder(inner):
            top = sorted(p.name for p in tmp.iterdir())
            raise DataSourceError(f"{zip_path}: not a BEIR zip (no {name}/corpus.jsonl; it holds {top})")
        os.replace(inner, dest)
    except zipfile.BadZipFile as err:
        raise DataSourceError(f"{zip_path}: not a zip file ({err}); delete it and run again") from err
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def not_found_message(name: str, looked: list[str], failure: str) -> str:
    if name == "mkqa":
        hint = (f"place the release's mkqa.jsonl.gz at {cache_dir() / 'mkqa' / 'mkqa.jsonl.gz'} (the cache; ${ENV_CACHE} "
                f"moves it) or under <data_root>/mkqa/, or point source at the file, or ${ENV_MKQA_MIRROR} at a server "
                "holding mkqa.jsonl.gz")
    else:
        hint = (f"unzip BEIR's {name}.zip so that {cache_dir() / 'beir' / name / 'corpus.jsonl'} exists (the cache; "
                f"${ENV_CACHE} moves it), or point --data.init_args.data_root (or ${ENV_DATA}) at a folder holding "
                f"beir/{name}/, or ${ENV_BEIR_MIRROR} at a server holding {name}.zip")
    return f"dataset {name!r} is not available: looked in {'; '.join(looked)}; {failure}. To place it by hand, {hint}"


def _short(err: BaseException) -> str:
    return str(err).splitlines()[0][:300] if str(err) else type(err).__name__


def atomic_write_lines(path: Path, lines: Iterable[str]) -> int:
    """Write ``lines`` to ``path`` (gzip if it ends in .gz) through a temporary file renamed into place."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.partial-{os.getpid()}")
    opener = gzip.open if path.suffix == ".gz" else open
    n = 0
    try:
        with opener(tmp, "wt", encoding="utf-8") as fh:
            for line in lines:
                fh.write(line)
                n += 1
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return n


class HFBeirSource:
    """A BEIR-layout dataset on the Hugging Face hub (``BeIR/<name>`` + ``BeIR/<name>-qrels``, or
    ``mteb/<name>``), streamed with ``datasets`` into ``<cache>/hf/<org>__<name>/`` in BEIR's layout.

    The files are named explicitly (``data_files``) rather than through the repositories' loading
    scripts, which current ``datasets`` no longer runs; the same code reads a local folder laid out like
    the hub when ``$SEARCH_R3_HF_MIRROR`` is set."""

    # candidate files per role, in order; {split} is filled in
    LAYOUTS = {
        "beir": {"corpus": ["corpus.jsonl.gz", "corpus.jsonl"], "queries": ["queries.jsonl.gz", "queries.jsonl"],
                 "qrels": ["{split}.tsv"]},
        "mteb": {"corpus": ["corpus.jsonl", "corpus.jsonl.gz"], "queries": ["queries.jsonl", "queries.jsonl.gz"],
                 "qrels": ["qrels/{split}.tsv"]},
    }

    def __init__(self, repo: str) -> None:
        if repo.count("/") != 1:
            raise DataSourceError(f"hf:{repo}: expected hf:<org>/<name>, for example hf:BeIR/scifact or hf:mteb/scifact")
        self.repo = repo
        self.layout = self.LAYOUTS["beir" if repo.split("/")[0].lower() == "beir" else "mteb"]
        self.qrels_repo = f"{repo}-qrels" if self.layout is self.LAYOUTS["beir"] else repo
        self.dest = cache_dir() / "hf" / repo.replace("/", "__")

    def _location(self, repo: str, file: str) -> str:
        mirror = os.environ.get(ENV_HF_MIRROR)
        return str(Path(mirror).expanduser() / repo / file) if mirror else f"hf://datasets/{repo}/{file}"

    def _stream(self, repo: str, candidates: list[str], builder: str, **kwargs: object) -> Iterator[dict]:
        """Rows of the first candidate file that exists, streamed; DataSourceError if none does."""
        import datasets

        errors = []
        for file in candidates:
            location = self._location(repo, file)
            try:
                rows = datasets.load_dataset(builder, data_files={"rows": location}, split="rows", streaming=True,
                                             **kwargs)
                first = iter(rows)
                head = next(first, None)
            except (FileNotFoundError, OSError, ValueError) as err:
                errors.append(f"{location}: {type(err).__name__}: {_short(err)}")
                continue
            return _chain(head, first)
        raise DataSourceError(f"hf:{self.repo}: could not stream {' or '.join(candidates)} ({'; '.join(errors)}); "
                              f"offline, set ${ENV_HF_MIRROR} to a local copy laid out like the hub, or place a BEIR "
                              f"folder in {self.dest}")

    def materialise(self, split: str | None) -> Path:
        import datasets

        self.dest.mkdir(parents=True, exist_ok=True)
        with FileLock(str(self.dest.parent / f".{self.dest.name}.lock")):
            for role, keys in (("corpus", ("_id", "title", "text")), ("queries", ("_id", "text"))):
                target = self.dest / f"{role}.jsonl.gz"
                if not target.is_file():
                    rows = self._stream(self.repo, self.layout[role], "json")
                    n = atomic_write_lines(target, (json.dumps({k: r.get(k) for k in keys if k in r}, ensure_ascii=False)
                                                    + "\n" for r in rows))
                    log.info("hf:%s: %d %s rows streamed into %s", self.repo, n, role, target)
            if split is not None:
                target = self.dest / "qrels" / f"{split}.tsv"
                if not target.is_file():
                    names = [c.format(split=split) for c in self.layout["qrels"]]
                    # ids as strings ("0001" must not become 1): the columns typed explicitly
                    as_text = datasets.Features({c: datasets.Value("string") for c in ("query-id", "corpus-id", "score")})
                    rows = self._stream(self.qrels_repo, names, "csv", sep="\t", features=as_text)
                    n = atomic_write_lines(target, _qrels_lines(rows))
                    log.info("hf:%s: %d %s judgements into %s", self.qrels_repo, n - 1, split, target)
        return self.dest


def _chain(head: dict | None, rest: Iterator[dict]) -> Iterator[dict]:
    if head is not None:
        yield head
        yield from rest


def _qrels_lines(rows: Iterator[dict]) -> Iterator[str]:
    yield "query-id\tcorpus-id\tscore\n"
    for r in rows:
        yield f"{r.get('query-id', r.get('query_id'))}\t{r.get('corpus-id', r.get('corpus_id'))}\t{r.get('score')}\n"
