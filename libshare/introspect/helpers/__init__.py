"""drgn-style walkers of kernel structures in guest memory, small typed functions that
compose: ``lists`` (bounded ``list_head`` walks), ``tasks`` (tasks and threads), ``mm``
(VMAs, resident frames, build-ids), ``maple`` (the maple tree of 6.1+ mms) and ``fs``
(file paths and filesystems). Each walk is bounded: hostile memory ends it with
WalkError, never a hang."""
