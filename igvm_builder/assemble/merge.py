"""Merging per-platform directive lists into one, with compatibility masks: a header identical
on several platforms is stored once, and each platform's projection is exactly its own list."""

from __future__ import annotations

import bisect
import hashlib
import operator
from collections.abc import Sequence
from typing import Any

from igvm_builder.assemble.plan import _PageRun
from igvm_builder.format import headers as H
from igvm_builder.format.blob import FileSlice, as_view
from igvm_builder.format.pages import Directives, PageRun, new_page_unchecked


def _key(h: H.Header) -> tuple[Any, ...]:
    """Identity of a directive apart from its compatibility mask.

    Page data in a file window is identified by the exact view object, offset and length
    (equal keys mean equal bytes; offsets are relative to that view, so the view object,
    not the file it maps, must be part of the key); copied data by the bytes themselves.
    """
    if isinstance(h, H.PageData):
        d = h.data
        if isinstance(d, FileSlice):
            dk: tuple[Any, ...] = ("s", id(d._buf), d.start, d.length)
        else:
            dk = ("b", bytes(d))
        return (H.PageData, h.gpa, h.flags, int(h.data_type), dk)
    if isinstance(h, H.SnpVpContext):
        return (H.SnpVpContext, h.gpa, h.vp_index, hashlib.sha256(as_view(h.vmsa)).digest())
    if h.HAS_MASK:
        return (type(h), h.pack_body(0), repr(h))
    return (type(h), repr(h))


def _with_mask(h: H.Header, mask: int) -> H.Header:
    if type(h) is H.PageData:  # the common case, one per page of the file
        return new_page_unchecked(h.gpa, mask, h.flags, h.data_type, h.data)
    if not h.HAS_MASK:
        return h
    from igvm_builder.recordclass import replace

    changes: dict[str, Any] = {"compatibility_mask": mask}  # every header with HAS_MASK has the field
    return replace(h, **changes)


#: A planned directive: a header, or a run of pages expanded into headers after the merge.
Planned = H.Header | _PageRun


def merge_directives(lists: Sequence[tuple[int, Sequence[Planned]]]) -> Directives:
    """Merge per-platform directive lists into one; equal headers share one multi-bit mask.

    Guarantees: for every (mask, list) input, the headers whose mask contains ``mask`` are
    exactly ``list``, in order.  Sharing is greedy: when two lists disagree, the header
    that the other list does not need next is emitted alone.  A :class:`_PageRun` in the lists
    is one item (equal only to itself); in the result it becomes its page runs, with the merged
    mask (the result is a :class:`Directives`: a sequence of headers that stores runs as runs).
    """
    keys: list[Any] = []
    hdrs: list[Planned] = []
    masks: list[int] = []
    key_of: dict[int, Any] = {}  # id(header) -> key: headers shared by platforms are keyed once
    alive: list[list[Planned]] = []  # keeps every header alive while its id() is a cache key
    for mask, items in lists:
        items = list(items)
        alive.append(items)
        # key each header once (those shared with an earlier list are found by identity)
        known = list(map(key_of.get, map(id, items)))
        bkeys = [k if k is not None else _directive_key(h, mask) for k, h in zip(known, items, strict=True)]
        key_of.update(zip(map(id, items), bkeys, strict=True))
        keys, hdrs, masks = _merge_two(keys, hdrs, masks, bkeys, items, mask)
    out: list[H.Header | PageRun] = []
    for h, m in zip(hdrs, masks, strict=True):
        if isinstance(h, _PageRun):
            out += h.items(m)
        else:
            out.append(_with_mask(h, m))
    return Directives(out)


def _directive_key(h: H.Header | _PageRun, mask: int) -> Any:
    if isinstance(h, _PageRun):
        return (_PageRun, id(h))  # kept alive by merge_directives while keys are compared
    if isinstance(h, H.VpContextBase):
        # A VP context must carry exactly one platform's mask (IGVM_FORMAT.md; the reference
        # parser rejects anything else), so identical contexts of two platforms stay apart.
        return (_key(h), mask)
    return _key(h)


def _positions(keys: list[Any]) -> dict[Any, int | list[int]]:
    """key -> its index, or the ascending list of its indices when it occurs more than once."""
    unique: dict[Any, int | list[int]] = dict(zip(keys, range(len(keys)), strict=True))
    if len(unique) == len(keys):  # the usual case, built at C speed
        return unique
    pos: dict[Any, int | list[int]] = {}
    for i, k in enumerate(keys):
        prev = pos.setdefault(k, i)
        if prev != i:
            if isinstance(prev, int):
                pos[k] = [prev, i]
            else:
                prev.append(i)
    return pos


def _next_at(keys: list[Any], pos: dict[Any, int | list[int]] | None, key: Any, start: int
             ) -> tuple[int | None, dict[Any, int | list[int]] | None]:
    """The first index of ``key`` in ``keys`` at or after ``start`` (and the position index).

    A short scan at C speed answers the usual case (the lists differ by a few headers); the
    position index of the whole list is built only when the key is not close by.
    """
    near = 256
    try:
        return keys.index(key, start, start + near), pos
    except ValueError:
        pass
    if start + near >= len(keys):
        return None, pos
    if pos is None:
        pos = _positions(keys)
    return _lookup(pos, key, start), pos


def _lookup(pos: dict[Any, int | list[int]], key: Any, start: int) -> int | None:
    found = pos.get(key)
    if found is None:
        return None
    if isinstance(found, int):
        return found if found >= start else None
    i = bisect.bisect_left(found, start)
    return found[i] if i < len(found) else None


def _merge_two(a_keys: list[Any], a_hdrs: list[Planned], a_masks: list[int], b_keys: list[Any],
               b_hdrs: list[Planned], b_mask: int) -> tuple[list[Any], list[Planned], list[int]]:
    """Merge list ``b`` (all with mask ``b_mask``) into the merged list ``a``.

    Runs of equal keys (the bulk of any multi-platform build) are found by comparing windows
    of the two key lists at C speed; the greedy choice of :func:`merge_directives` is made
    only where the lists disagree.
    """
    if not a_keys:
        return list(b_keys), list(b_hdrs), [b_mask] * len(b_keys)
    na, nb = len(a_keys), len(b_keys)
    out_k: list[Any] = []
    out_h: list[Planned] = []
    out_m: list[int] = []
    pos_a: dict[Any, int | list[int]] | None = None
    pos_b: dict[Any, int | list[int]] | None = None
    i = j = 0
    while i < na and j < nb:
        window = 16
        while i < na and j < nb:  # copy the run of equal keys starting at (i, j)
            n = min(window, na - i, nb - j)
            same = list(map(operator.eq, a_keys[i : i + n], b_keys[j : j + n]))
            run = same.index(False) if False in same else n
            if run:
                out_k += a_keys[i : i + run]
                out_h += a_hdrs[i : i + run]
                out_m += [m | b_mask for m in a_masks[i : i + run]]
                i += run
                j += run
            if run < n:
                break
            window = min(window * 4, 1 << 16)
        if i >= na or j >= nb:
            break
        next_in_b, pos_b = _next_at(b_keys, pos_b, a_keys[i], j)
        next_in_a, pos_a = _next_at(a_keys, pos_a, b_keys[j], i)
        if next_in_b is None or (next_in_a is not None and next_in_a - i <= next_in_b - j):
            out_k.append(a_keys[i])
            out_h.append(a_hdrs[i])
            out_m.append(a_masks[i])
            i += 1
        else:
            out_k.append(b_keys[j])
            out_h.append(b_hdrs[j])
            out_m.append(b_mask)
            j += 1
    out_k += a_keys[i:]
    out_h += a_hdrs[i:]
    out_m += a_masks[i:]
    out_k += b_keys[j:]
    out_h += b_hdrs[j:]
    out_m += [b_mask] * (nb - j)
    return out_k, out_h, out_m
