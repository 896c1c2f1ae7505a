"""Rebuild ``pyro_sgmcmc/datasets/data/books/*.txt.xz`` from Debian's R data packages.

Not imported by the package: this is the provenance of the shipped book texts, kept so
that anyone can check them. It reads R's lazy-load databases directly (no R install):

    apt-get update
    apt-get download r-cran-janeaustenr r-cran-tokenizers
    for d in r-cran-janeaustenr_*.deb r-cran-tokenizers_*.deb; do dpkg -x "$d" root; done
    python scripts/extract_books.py root            # writes the .txt.xz files
    python scripts/extract_books.py root --check    # compares with the shipped files

The texts were made from Project Gutenberg e-texts by the R packages' authors
(janeaustenr 1.0.0 by Julia Silge, tokenizers 0.3.0 by Lincoln Mullen, both MIT;
Debian packages r-cran-janeaustenr 1.0.0-1 and r-cran-tokenizers 0.3.0-1). The novels
are in the public domain.

Format notes (R's ``makeLazyLoadDB``): ``data/Rdata.rdx`` is a gzip-compressed
serialisation of ``list(variables = list(<name> = c(offset, length)), references, compressed)``;
``data/Rdata.rdb`` holds, at each ``offset``, ``length`` bytes: a 4-byte big-endian size
of the uncompressed data, then (compression type 1) a zlib stream of the object's
serialisation (XDR format, version 2 or 3). The reader below understands the subset of
that format the data objects use: vectors, strings, pairlists, symbols, references,
environments and ALTREP wrappers.
"""

from __future__ import annotations

import argparse
import gzip
import lzma
import struct
import sys
import zlib
from pathlib import Path

# (output name, R package, R object name): the order of load_books().
BOOKS = [
    ("sense_and_sensibility", "janeaustenr", "sensesensibility"),
    ("pride_and_prejudice", "janeaustenr", "prideprejudice"),
    ("mansfield_park", "janeaustenr", "mansfieldpark"),
    ("emma", "janeaustenr", "emma"),
    ("northanger_abbey", "janeaustenr", "northangerabbey"),
    ("persuasion", "janeaustenr", "persuasion"),
    ("moby_dick", "tokenizers", "mobydick"),
]

OUT = Path(__file__).resolve().parents[1] / "pyro_sgmcmc" / "datasets" / "data" / "books"

# SEXP type codes (R internals, serialize.c).
NILSXP, SYMSXP, LISTSXP, CLOSXP, ENVSXP, PROMSXP, LANGSXP = 0, 1, 2, 3, 4, 5, 6
CHARSXP, LGLSXP, INTSXP, REALSXP, CPLXSXP, STRSXP = 9, 10, 13, 14, 15, 16
DOTSXP, VECSXP, EXPRSXP, RAWSXP = 17, 19, 20, 24
REFSXP, NILVALUE, GLOBALENV, UNBOUNDVALUE, MISSINGARG, BASENAMESPACE = (
    255, 254, 253, 252, 251, 250)
NAMESPACESXP, PACKAGESXP, PERSISTSXP = 249, 248, 247
EMPTYENV, BASEENV, ATTRLANGSXP, ATTRLISTSXP, ALTREP = 242, 241, 240, 239, 238


class RObject:
    """A decoded R value: ``value`` (list/str/None/...) and its ``attributes`` dict."""

    def __init__(self, rtype: int, value, attributes: dict | None = None):
        self.rtype, self.value, self.attributes = rtype, value, attributes or {}

    def __repr__(self) -> str:
        return f"RObject(type={self.rtype}, len={len(self.value) if self.value else 0})"


class Unserializer:
    """A reader for R's XDR serialisation format (the subset data objects use)."""

    def __init__(self, data: bytes):
        self.data, self.pos, self.refs = data, 0, []

    def _take(self, n: int) -> bytes:
        out = self.data[self.pos:self.pos + n]
        if len(out) != n:
            raise ValueError("truncated R serialisation")
        self.pos += n
        return out

    def _int(self) -> int:
        return struct.unpack(">i", self._take(4))[0]

    def _length(self) -> int:
        n = self._int()
        if n == -1:  # long vector: two ints
            hi, lo = self._int(), self._int()
            n = (hi << 32) + lo
        return n

    def read(self) -> RObject | None:
        if self._take(2) != b"X\n":
            raise ValueError("not an XDR ('X') R serialisation")
        version = self._int()
        self._int(), self._int()  # writer's and minimal reader's R versions
        if version == 3:
            self._take(self._int())  # native encoding name
        elif version != 2:
            raise ValueError(f"unsupported serialisation version {version}")
        return self._item()

    def _attributes_dict(self, pairlist) -> dict:
        out = {}
        node = pairlist
        while isinstance(node, RObject) and node.rtype in (LISTSXP, ATTRLISTSXP):
            tag, car, cdr = node.value
            out[tag] = car
            node = cdr
        return out

    def _item(self):
        flags = self._int()
        rtype = flags & 0xFF
        levels = flags >> 12
        has_attr, has_tag = bool(flags & (1 << 9)), bool(flags & (1 << 10))
        if rtype == NILVALUE:
            return None
        if rtype in (GLOBALENV, EMPTYENV, BASEENV, BASENAMESPACE, UNBOUNDVALUE, MISSINGARG):
            return RObject(rtype, None)
        if rtype == REFSXP:
            index = flags >> 8 or self._int()
            return self.refs[index - 1]
        if rtype in (PERSISTSXP, NAMESPACESXP, PACKAGESXP):
            self._int()  # 0
            n = self._int()
            obj = RObject(rtype, [self._item() for _ in range(n)])
            self.refs.append(obj)
            return obj
        if rtype == SYMSXP:
            name = self._item()  # a CHARSXP
            self.refs.append(name)
            return name
        if rtype == ENVSXP:
            obj = RObject(ENVSXP, None)
            self.refs.append(obj)
            self._int()  # locked
            enclos, frame, hashtab, attrib = (self._item() for _ in range(4))
            obj.value = {"enclos": enclos, "frame": frame, "hashtab": hashtab}
            obj.attributes = self._attributes_dict(attrib)
            return obj
        if rtype in (LISTSXP, LANGSXP, CLOSXP, PROMSXP, DOTSXP, ATTRLANGSXP, ATTRLISTSXP):
            attrib = self._item() if has_attr else None
            tag = self._item() if has_tag else None
            car = self._item()
            cdr = self._item()
            return RObject(rtype, (tag, car, cdr), self._attributes_dict(attrib))
        if rtype == ALTREP:
            info, state, attrib = self._item(), self._item(), self._item()
            return self._altrep(info, state, self._attributes_dict(attrib))
        if rtype == CHARSXP:
            n = self._int()
            if n == -1:
                return None  # NA_character_
            raw = self._take(n)
            latin1 = bool(levels & (1 << 2))
            return raw.decode("latin-1" if latin1 else "utf-8")
        if rtype in (LGLSXP, INTSXP):
            n = self._length()
            value = list(struct.unpack(f">{n}i", self._take(4 * n)))
        elif rtype == REALSXP:
            n = self._length()
            value = list(struct.unpack(f">{n}d", self._take(8 * n)))
        elif rtype == CPLXSXP:
            n = self._length()
            flat = struct.unpack(f">{2 * n}d", self._take(16 * n))
            value = [complex(a, b) for a, b in zip(flat[::2], flat[1::2], strict=True)]
        elif rtype == RAWSXP:
            value = self._take(self._length())
        elif rtype in (STRSXP, VECSXP, EXPRSXP):
            value = [self._item() for _ in range(self._length())]
        else:
            raise ValueError(f"R type {rtype} is not supported by this reader")
        attributes = self._attributes_dict(self._item()) if has_attr else {}
        return RObject(rtype, value, attributes)

    @staticmethod
    def _altrep(info, state, attributes):
        cls = info.value[1] if isinstance(info, RObject) else None  # pairlist(class, pkg, type)
        if cls == "compact_intseq":
            n, start, step = (int(v) for v in state.value)
            return RObject(INTSXP, list(range(start, start + n * step, step)), attributes)
        if cls == "compact_realseq":
            n, start, step = state.value
            return RObject(REALSXP, [start + i * step for i in range(int(n))], attributes)
        if cls and cls.startswith("wrap_"):  # state = list(x, meta)
            inner = state.value[0]
            return RObject(inner.rtype, inner.value, {**inner.attributes, **attributes})
        if cls == "deferred_string":  # state = pairlist(numeric vector, ...)
            numbers = state.value[1]
            text = [None if v is None else format(v, "g") for v in numbers.value]
            return RObject(STRSXP, text, attributes)
        raise ValueError(f"ALTREP class {cls!r} is not supported by this reader")


def unserialize(data: bytes):
    return Unserializer(data).read()


def read_lazyload_db(data_dir: Path) -> dict[str, RObject]:
    """All objects of an R lazy-load database ``data_dir/Rdata.{rdx,rdb}``, by name."""
    index = unserialize(gzip.decompress((data_dir / "Rdata.rdx").read_bytes()))
    fields = dict(zip(index.attributes["names"].value, index.value, strict=True))
    variables = fields["variables"]
    rdb = (data_dir / "Rdata.rdb").read_bytes()
    out = {}
    for name, where in zip(variables.attributes["names"].value, variables.value, strict=True):
        offset, length = (int(v) for v in where.value)
        record = rdb[offset:offset + length]
        size = struct.unpack(">I", record[:4])[0]
        payload = zlib.decompress(record[4:])
        if len(payload) != size:
            raise ValueError(f"{name}: size {len(payload)} != recorded {size}")
        out[name] = unserialize(payload)
    return out


def strip_gutenberg(text: str) -> str:
    """The text between Project Gutenberg's ``*** START OF`` and ``*** END OF`` lines,
    less the ``Produced by`` credit and the ``End of Project Gutenberg's ...`` line.

    ``mobydick`` keeps the e-text's header and licence; they are dropped so that the
    held-out tail of the book is Melville's text (and the shipped file carries no
    Project Gutenberg trademark). Texts without the markers are returned unchanged.
    """
    lines = text.lstrip("\ufeff").split("\n")
    starts = [i for i, line in enumerate(lines) if line.startswith("*** START OF")]
    ends = [i for i, line in enumerate(lines) if line.startswith("*** END OF")]
    if not starts:
        return "\n".join(lines)
    body = lines[starts[0] + 1:ends[0] if ends else None]
    # The transcribers' credit before the book and PG's closing line after it.
    credits = ("Produced by ", "End of Project Gutenberg")
    body = [line for line in body if not line.startswith(credits)]
    return "\n".join(body)


def book_text(obj: RObject) -> str:
    """A character vector of lines (or one string) as one text; NA lines become empty."""
    if obj.rtype != STRSXP:
        raise ValueError(f"expected a character vector, got R type {obj.rtype}")
    text = "\n".join("" if line is None else line for line in obj.value).replace("\r\n", "\n")
    return strip_gutenberg(text).strip("\n") + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("root", type=Path, help="where the .deb files were dpkg -x'ed")
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("--check", action="store_true", help="compare, write nothing")
    args = parser.parse_args(argv)
    site = args.root / "usr" / "lib" / "R" / "site-library"
    dbs: dict[str, dict[str, RObject]] = {}
    mismatches = 0
    for name, package, obj in BOOKS:
        if package not in dbs:
            dbs[package] = read_lazyload_db(site / package / "data")
        text = book_text(dbs[package][obj])
        path = args.out / f"{name}.txt.xz"
        if args.check:
            same = path.exists() and lzma.decompress(path.read_bytes()).decode() == text
            mismatches += not same
            print(f"{name}: {'ok' if same else 'DIFFERS'}")
            continue
        path.parent.mkdir(parents=True, exist_ok=True)
        # Fixed preset and no timestamps in .xz: the same liblzma gives the same bytes
        # (--check compares the decompressed text, which never depends on it).
        path.write_bytes(lzma.compress(text.encode(), preset=9 | lzma.PRESET_EXTREME))
        print(f"{name}: {len(text):,} characters -> {path.stat().st_size:,} bytes")
    return 1 if mismatches else 0


if __name__ == "__main__":
    sys.exit(main())
