#!/usr/bin/env python3
"""Builds the byte-level training / held-out text for the toy transformer from the KJV Bible.

Source: the Debian `bible` command (package `bible-kjv`), `bible "Gen1:1-Rev22:21"`, which prints
the whole King James Version (~4.3 MB): a chapter header such as "Genesis 1" on its own line
(surrounded by blank lines), then verses "  1 In the beginning ..." wrapped at ~80 columns.

Output format (ASCII, '\n' line ends), one block per chapter, blocks separated by one blank line:

    Genesis 1
    1 In the beginning God created the heaven and the earth.
    2 And the earth was without form, and void; ...
    <blank line>
    Genesis 2
    ...

Each verse is unwrapped onto one line and its whitespace collapsed to single spaces. The last line
of each file ends with '\n'. Whole books are held out for evaluation (HELDOUT_BOOKS) and written,
in canonical order, to data/heldout.txt; everything else goes to data/train.txt. The output is a
pure function of the `bible` output, so reruns are byte-identical.

Usage: python3 prepare_data.py [--out data] [--input kjv.txt]
  --input  read the raw `bible` output from a file instead of running the command.
"""

import argparse
import os
import re
import subprocess
import sys

HELDOUT_BOOKS = ("Ruth", "Esther", "Ecclesiastes", "Jonah", "Philippians", "James")
EXPECTED_BOOKS = 66
EXPECTED_CHAPTERS = 1189
EXPECTED_VERSES = 31102

HEADER_RE = re.compile(r"^((?:[123] )?[A-Z][a-z]+(?: of [A-Z][a-z]+)?) (\d+)$")
VERSE_RE = re.compile(r"^ +(\d+) (.*)$")


def read_raw(input_path):
    if input_path:
        with open(input_path, "rb") as f:
            return f.read()
    try:
        res = subprocess.run(["bible", "Gen1:1-Rev22:21"], stdout=subprocess.PIPE, check=True)
    except FileNotFoundError:
        sys.exit("prepare_data.py: the `bible` command is missing (Debian: apt-get install bible-kjv)")
    return res.stdout


def parse(raw):
    """Returns a list of (book, chapter, [(verse_no, text), ...]) in order."""
    text = raw.decode("ascii")  # raises on any non-ASCII byte
    chapters = []
    verses = None   # verse list of the current chapter
    cur = None      # [verse_no, [pieces]] of the verse being unwrapped
    prev_blank = True

    def flush_verse():
        nonlocal cur
        if cur is not None:
            verses.append((cur[0], " ".join(" ".join(cur[1]).split())))
            cur = None

    for line in text.split("\n"):
        line = line.rstrip()
        if not line:
            prev_blank = True
            continue
        m = HEADER_RE.match(line)
        if m and prev_blank:
            if verses is not None:
                flush_verse()
            verses = []
            chapters.append((m.group(1), int(m.group(2)), verses))
        else:
            if verses is None:
                raise ValueError("text before the first chapter header: %r" % line)
            v = VERSE_RE.match(line)
            if v:
                flush_verse()
                cur = [int(v.group(1)), [v.group(2)]]
            else:
                if cur is None:
                    raise ValueError("continuation line without a verse: %r" % line)
                cur[1].append(line)
        prev_blank = False
    if verses is not None:
        flush_verse()
    return chapters


def check(chapters):
    books = []
    for book, ch, verses in chapters:
        if not books or books[-1] != book:
            books.append(book)
        if not verses:
            raise ValueError("%s %d has no verses" % (book, ch))
        for i, (no, text) in enumerate(verses):
            if no != i + 1 or not text:
                raise ValueError("%s %d: bad verse %d (%r)" % (book, ch, no, text[:40]))
    n_verses = sum(len(v) for _, _, v in chapters)
    if len(books) != EXPECTED_BOOKS or len(set(books)) != EXPECTED_BOOKS:
        raise ValueError("expected %d books, got %d" % (EXPECTED_BOOKS, len(books)))
    if len(chapters) != EXPECTED_CHAPTERS or n_verses != EXPECTED_VERSES:
        raise ValueError("expected %d chapters / %d verses, got %d / %d"
                         % (EXPECTED_CHAPTERS, EXPECTED_VERSES, len(chapters), n_verses))
    missing = [b for b in HELDOUT_BOOKS if b not in books]
    if missing:
        raise ValueError("held-out books not found: %s" % missing)
    return books, n_verses


def render(chapters):
    blocks = []
    for book, ch, verses in chapters:
        lines = ["%s %d" % (book, ch)] + ["%d %s" % (no, text) for no, text in verses]
        blocks.append("\n".join(lines) + "\n")
    return "\n".join(blocks).encode("ascii")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "data"))
    ap.add_argument("--input", default=None, help="raw `bible` output to use instead of running it")
    args = ap.parse_args()

    chapters = parse(read_raw(args.input))
    books, n_verses = check(chapters)
    train = render([c for c in chapters if c[0] not in HELDOUT_BOOKS])
    heldout = render([c for c in chapters if c[0] in HELDOUT_BOOKS])
    for name, data in (("train", train), ("heldout", heldout)):
        if any(b >= 128 for b in data):
            raise ValueError("%s.txt contains non-ASCII bytes" % name)

    os.makedirs(args.out, exist_ok=True)
    for name, data in (("train.txt", train), ("heldout.txt", heldout)):
        with open(os.path.join(args.out, name), "wb") as f:
            f.write(data)
    n_held_ch = sum(1 for c in chapters if c[0] in HELDOUT_BOOKS)
    print("parsed %d books, %d chapters, %d verses" % (len(books), len(chapters), n_verses))
    print("held-out books: %s (%d chapters)" % (", ".join(HELDOUT_BOOKS), n_held_ch))
    print("%s: %d bytes" % (os.path.join(args.out, "train.txt"), len(train)))
    print("%s: %d bytes" % (os.path.join(args.out, "heldout.txt"), len(heldout)))


if __name__ == "__main__":
    main()
