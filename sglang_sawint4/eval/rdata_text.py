"""The character vectors of an R lazy-load database (``data/Rdata.rdb``) as plain text.

Debian's r-cran-janeaustenr ships Jane Austen's six novels that way (one vector of lines
per novel); R is not needed to read them:

    python -m sglang_sawint4.eval.rdata_text DIR/usr/lib/R/site-library/janeaustenr/data/Rdata.rdb > austen.txt

Each database entry is a 4-byte big-endian length and a zlib stream of R's XDR
serialization (format 2 or 3); only a top-level character vector (STRSXP of CHARSXPs) is
read from each entry, anything else is skipped.
"""

import struct
import sys
import zlib

STRSXP, CHARSXP = 16, 9


def entries(blob: bytes):
    """The decompressed entries of an .rdb file, in file order."""
    pos = 0
    while pos < len(blob):
        (length,) = struct.unpack(">i", blob[pos: pos + 4])
        d = zlib.decompressobj()
        out = d.decompress(blob[pos + 4:])
        if len(out) != length:
            raise ValueError(f"entry at byte {pos}: {len(out)} bytes, header says {length}")
        yield out
        pos = len(blob) - len(d.unused_data)


def character_vector(entry: bytes):
    """The strings of a serialized top-level STRSXP (None for other objects); NA -> None."""
    if entry[:2] != b"X\n":
        raise ValueError("not an XDR serialization")
    pos = 2
    version, _, _ = struct.unpack(">iii", entry[pos: pos + 12])
    pos += 12
    if version == 3:  # the native encoding's name follows
        (n,) = struct.unpack(">i", entry[pos: pos + 4])
        pos += 4 + n
    (flags,) = struct.unpack(">i", entry[pos: pos + 4])
    if flags & 0xFF != STRSXP:
        return None
    (count,) = struct.unpack(">i", entry[pos + 4: pos + 8])
    pos += 8
    strings = []
    for _ in range(count):
        flags, length = struct.unpack(">ii", entry[pos: pos + 8])
        pos += 8
        if flags & 0xFF != CHARSXP:
            raise ValueError(f"element of type {flags & 0xFF} in a character vector")
        if length == -1:
            strings.append(None)
            continue
        strings.append(entry[pos: pos + length].decode("utf-8", errors="replace"))
        pos += length
    return strings


def main():
    if len(sys.argv) != 2:
        raise SystemExit(__doc__)
    with open(sys.argv[1], "rb") as f:
        blob = f.read()
    for entry in entries(blob):
        lines = character_vector(entry)
        if lines:
            sys.stdout.write("\n".join(s or "" for s in lines) + "\n\n")


if __name__ == "__main__":
    main()
