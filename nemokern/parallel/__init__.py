"""Distributed helpers: the all-reduce front end of the nemokern._C extension."""

from .all_reduce import all_reduce  # noqa: F401
