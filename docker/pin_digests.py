#!/usr/bin/env python3
"""Pin or check the base-image digests of docker/Dockerfile.* (`make docker-pin`, `make docker-pin-check`).

Every ``FROM`` names its image by tag *and* digest (``name:tag@sha256:<64 hex>``): the tag says what
it is, the digest makes it immutable.  Needs a Docker CLI with buildx and registry access:

    python docker/pin_digests.py            # rewrite each FROM with the digest its tag has now
    python docker/pin_digests.py --check    # each pinned digest still resolves; show tags that moved

The digest is the one of the tag's manifest list (multi-platform index), what ``docker pull name:tag``
resolves, from ``docker buildx imagetools inspect``.  Standard library only.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

DOCKER_DIR = Path(__file__).resolve().parent
DIGEST_RE = re.compile(r"^sha256:[0-9a-f]{64}$")
# FROM [--platform=...] image[:tag][@digest] [AS name]
FROM_RE = re.compile(
    r"^(?P<head>\s*FROM\s+(?:--\S+\s+)*)(?P<image>[^\s@]+?)(?::(?P<tag>[\w][\w.-]*))?"
    r"(?:@(?P<digest>\S+))?(?P<tail>(?:\s+AS\s+\S+)?\s*)$",
    re.IGNORECASE,
)


def split_ref(ref: str) -> tuple[str, str | None, str | None]:
    """``name:tag@digest`` -> (name, tag, digest); a registry port (``host:5000/x``) is not a tag."""
    name, _, digest = ref.partition("@")
    tag = None
    slash, colon = name.rfind("/"), name.rfind(":")
    if colon > slash:
        name, tag = name[:colon], name[colon + 1 :]
    return name, tag, digest or None


def pin_line(line: str, resolve: Callable[[str], str]) -> str:
    """Return ``line`` with the digest of its FROM image replaced by ``resolve("name:tag")``.

    Lines that are not FROM, and FROM lines naming an earlier build stage (no tag), are returned
    unchanged.
    """
    m = FROM_RE.match(line.rstrip("\n"))
    if m is None or m.group("tag") is None:
        return line
    digest = resolve(f"{m.group('image')}:{m.group('tag')}")
    if not DIGEST_RE.match(digest):
        raise ValueError(f"not a sha256 digest: {digest!r}")
    newline = "\n" if line.endswith("\n") else ""
    return f"{m.group('head')}{m.group('image')}:{m.group('tag')}@{digest}{m.group('tail')}{newline}"


def inspect_digest(ref: str) -> str:
    """Digest of ``ref`` (its manifest list, or its manifest for a single-platform image)."""
    out = subprocess.run(
        ["docker", "buildx", "imagetools", "inspect", ref, "--format", "{{json .Manifest}}"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    return str(json.loads(out)["digest"])


def dockerfiles() -> list[Path]:
    return sorted(DOCKER_DIR.glob("Dockerfile.*"))


def pinned_refs(path: Path) -> list[str]:
    """The ``name:tag@digest`` references of the FROM lines of ``path`` (stage names excluded)."""
    refs = []
    for line in path.read_text().splitlines():
        m = FROM_RE.match(line)
        if m is not None and m.group("tag") is not None:
            refs.append(f"{m.group('image')}:{m.group('tag')}@{m.group('digest') or ''}")
    return refs


def check() -> int:
    """Exit status 1 if a FROM lacks a valid digest or its digest no longer resolves."""
    failed = False
    for path in dockerfiles():
        for ref in dict.fromkeys(pinned_refs(path)):
            name, tag, digest = split_ref(ref)
            if digest is None or not DIGEST_RE.match(digest):
                print(f"{path.name}: {name}:{tag}: no valid digest ({digest!r})")
                failed = True
                continue
            try:
                inspect_digest(f"{name}@{digest}")
            except subprocess.CalledProcessError as exc:
                print(f"{path.name}: {name}:{tag}@{digest}: does not resolve: {exc.stderr.strip()}")
                failed = True
                continue
            now = inspect_digest(f"{name}:{tag}")
            note = "tag unchanged" if now == digest else f"tag has moved to {now} (`make docker-pin`)"
            print(f"{path.name}: {name}:{tag}@{digest}: resolves; {note}")
    return 1 if failed else 0


def update() -> int:
    cache: dict[str, str] = {}

    def resolve(ref: str) -> str:
        if ref not in cache:
            cache[ref] = inspect_digest(ref)
        return cache[ref]

    for path in dockerfiles():
        text = path.read_text()
        new = "".join(pin_line(line, resolve) for line in text.splitlines(keepends=True))
        if new != text:
            path.write_text(new)
            print(f"updated {path}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="verify, do not rewrite")
    args = parser.parse_args(argv)
    return check() if args.check else update()


if __name__ == "__main__":
    sys.exit(main())
