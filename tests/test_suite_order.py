"""`make test`'s schedule: the files in ``conftest.SLOWEST_FILES`` exist and are collected first, in
that order (pytest-xdist then hands them out first: ``--dist loadfile --no-loadscope-reorder``)."""

import os

from conftest import SLOWEST_FILES

HERE = os.path.dirname(os.path.abspath(__file__))


def test_every_listed_file_exists():
    missing = [name for name in SLOWEST_FILES if not os.path.isfile(os.path.join(HERE, name))]
    assert not missing, f"conftest.SLOWEST_FILES names files that are gone: {missing}"


def test_listed_files_are_collected_first_in_their_order(request):
    files = list(dict.fromkeys(item.path.name for item in request.session.items))
    listed = [name for name in files if name in SLOWEST_FILES]
    assert files[: len(listed)] == listed, files
    assert listed == [name for name in SLOWEST_FILES if name in files]


def test_make_test_keeps_the_collection_order():
    makefile = open(os.path.join(HERE, "..", "Makefile")).read()
    line = next(l for l in makefile.splitlines() if "-m pytest" in l and "--dist loadfile" in l)
    assert "--no-loadscope-reorder" in line, line
