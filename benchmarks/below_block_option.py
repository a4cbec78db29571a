"""``--below-block-max-blocks``: the below-block rule a benchmark run compiles under.

benchmarks/latency.py and benchmarks/mip_quality.py both compare the rule of
:func:`oamipc.target.below_block` for any block-rounded group (``any``, the library's default)
with one-block groups only (``1``).  The rule is a module setting
(:data:`oamipc.target.BELOW_BLOCK_MAX_BLOCKS`); the run sets it for its own compiles and puts the
importing process's value back after, whatever happens.
"""

from __future__ import annotations

import argparse
from collections.abc import Iterator
from contextlib import contextmanager

from oamipc import target as target_rules


def add(parser: argparse.ArgumentParser) -> None:
    """Add the option (default ``any``)."""
    parser.add_argument("--below-block-max-blocks", default="any",
                        help="with auto: the block-rounded groups a MAC budget may let go below the block, those "
                             "of at most this many blocks, or any (the default; oamipc.target.BELOW_BLOCK_MAX_BLOCKS)")


def value(args: argparse.Namespace) -> int | None:
    """The option's setting (None: any group), or SystemExit with a one-line reason."""
    text = args.below_block_max_blocks
    try:
        return None if text == "any" else int(text)
    except ValueError:
        raise SystemExit(f"--below-block-max-blocks must be an integer or any, got {text!r}") from None


@contextmanager
def applied(max_blocks: int | None) -> Iterator[None]:
    """The rule is ``max_blocks`` inside the block, the importing process's own after it."""
    previous, target_rules.BELOW_BLOCK_MAX_BLOCKS = target_rules.BELOW_BLOCK_MAX_BLOCKS, max_blocks
    try:
        yield
    finally:
        target_rules.BELOW_BLOCK_MAX_BLOCKS = previous
