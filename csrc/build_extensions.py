"""How setup.py builds csrc/: placeholder until the C++ backends land."""

from setuptools.command.build_ext import build_ext


def ext_modules():
    return []


class BuildExt(build_ext):
    pass
