"""Offline text corpus
^^^^^^^^^^^^^^^^^^^^

Real English text that is on every machine where lightning_kd is installed, so the LM app runs with no network:

1. **scikit-learn's dataset descriptions**: every ``sklearn/datasets/descr/*.rst`` file (the ``DESCR`` texts of
   iris, digits, wine, breast cancer, diabetes, California housing, 20 newsgroups...), about 43 kB;
2. **the long descriptions (READMEs) of installed packages** in their ``*.dist-info/METADATA``, for the packages of
   :data:`DEFAULT_PACKAGES` that are installed: the dependencies of lightning_kd and of its ``llm`` extra.

Lines that are markup rather than prose (HTML tags, badge and image lines) are dropped and blank-line runs
collapsed. The result depends on the installed versions: :attr:`Corpus.sources` lists every source with its version
and size and :attr:`Corpus.signature` hashes the text, so a teacher trained on one corpus is never reused on another.
Your own text: ``TextDataModule(paths=[...])`` (``.txt``/``.md``/``.rst`` files, or directories of them).
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

#: packages whose README (metadata long description) joins the default corpus, when installed.
DEFAULT_PACKAGES = (
    "torch",
    "lightning",
    "torchmetrics",
    "timm",
    "hydra-core",
    "omegaconf",
    "scikit-learn",
    "rich",
    "numpy",
    "tqdm",
    "transformers",
    "tokenizers",
)
TEXT_SUFFIXES = (".txt", ".md", ".rst")
_MARKUP = re.compile(r"^\s*(<|\[!\[|!\[|\.\. (image|figure|raw)::|:target:|:alt:)")


@dataclass(frozen=True)
class Document:
    """One source text: where it came from (``sklearn:descr/iris.rst``, ``torch==2.14.1:README``, a path)."""

    source: str
    text: str


@dataclass(frozen=True)
class Corpus:
    """Documents in a fixed order, with a signature of their content."""

    documents: tuple[Document, ...]

    @property
    def signature(self) -> str:
        digest = hashlib.sha256()
        for doc in self.documents:
            digest.update(doc.source.encode() + b"\0" + doc.text.encode() + b"\0")
        return digest.hexdigest()[:16]

    @property
    def sources(self) -> list[str]:
        """``"source (N chars)"`` per document."""
        return [f"{doc.source} ({len(doc.text)} chars)" for doc in self.documents]

    @property
    def num_chars(self) -> int:
        return sum(len(doc.text) for doc in self.documents)


def clean_text(text: str) -> str:
    """Drop markup lines (HTML, badges, images), strip trailing spaces, collapse runs of blank lines."""
    lines = [line.rstrip() for line in text.splitlines() if not _MARKUP.match(line)]
    return re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip()


def sklearn_descriptions() -> list[Document]:
    """scikit-learn's dataset description files, sorted by name."""
    import sklearn

    folder = Path(sklearn.__file__).resolve().parent / "datasets" / "descr"
    return [
        Document(f"scikit-learn=={sklearn.__version__}:datasets/descr/{path.name}", clean_text(path.read_text()))
        for path in sorted(folder.glob("*.rst"))
    ]


def package_readmes(packages: Iterable[str] = DEFAULT_PACKAGES) -> list[Document]:
    """The metadata long descriptions of the installed ``packages`` (missing packages are skipped)."""
    docs = []
    for name in packages:
        try:
            meta = metadata.metadata(name)
        except metadata.PackageNotFoundError:
            continue
        body = meta.get_payload() or meta.get("Description") or ""  # type: ignore[attr-defined]
        text = clean_text(str(body))
        if text:
            docs.append(Document(f"{name}=={meta['Version']}:README", text))
    return docs


def default_corpus(packages: Iterable[str] = DEFAULT_PACKAGES) -> Corpus:
    """scikit-learn's dataset descriptions followed by the installed packages' READMEs (see the module docstring)."""
    return Corpus(tuple(sklearn_descriptions() + package_readmes(packages)))


def files_corpus(paths: Sequence[str | os.PathLike[str]]) -> Corpus:
    """The text files at ``paths`` (directories: their ``.txt``/``.md``/``.rst`` files, recursively, sorted)."""
    files: list[Path] = []
    for raw in paths:
        path = Path(raw).expanduser()
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.suffix in TEXT_SUFFIXES and p.is_file())
            if not found:
                raise FileNotFoundError(f"text directory {str(path)!r} holds no {'/'.join(TEXT_SUFFIXES)} files")
            files.extend(found)
        elif path.is_file():
            files.append(path)
        else:
            raise FileNotFoundError(
                f"text file {str(path)!r} does not exist; give existing files or directories (data.paths=[...]) or "
                "leave data.paths empty for the built-in corpus"
            )
    docs = tuple(Document(str(p), clean_text(p.read_text(errors="replace"))) for p in files)
    if not any(doc.text for doc in docs):
        raise ValueError(f"the text files {[str(p) for p in files]} are empty")
    return Corpus(docs)


__all__ = ["DEFAULT_PACKAGES", "Corpus", "Document", "default_corpus", "files_corpus", "package_readmes"]
