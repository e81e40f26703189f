"""Admission: rate limits, token quotas, concurrency caps and fair share.

Pure decisions (:mod:`.spec`, :mod:`.buckets`, :mod:`.quotas`, :mod:`.headers`, the scheduler in
:mod:`.fairshare`) apart from the counter stores that keep them (:mod:`.backend`: ``memory`` for
one process, ``redis`` for several). The request path calls :func:`.backend.admit` and settles
the grant it gets when the request ends. See docs/limits.md.
"""
