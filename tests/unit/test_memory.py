"""Idle memory after coldplug (kmodd.daemon.memory): the index caches are
dropped and read again on the next lookup, with the same answers."""

from __future__ import annotations

from pathlib import Path

import pytest

from kmodd.daemon.memory import release_memory
from kmodd.resolution.index import ModuleTree
from tests.fixtures import FakeModule, build_tree


@pytest.fixture(scope="module")
def moddir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    mods = [FakeModule("core", exports=["core_fn"]),
            FakeModule("nic", aliases=["pci:v00008086d0000100Esv*sd*bc*sc*i*"],
                       uses=["core_fn"]),
            FakeModule("snd", aliases=["pci:v00008086d00002668sv*sd*bc*sc*i*"])]
    return build_tree(tmp_path_factory.mktemp("tree"), mods)


class _Resolver:
    def __init__(self, tree: ModuleTree) -> None:
        self.tree = tree


@pytest.mark.parametrize("prepare_after", [256, 0])   # walking the trie / prepared index
def test_dropped_indexes_are_read_again_with_the_same_answers(moddir: Path,
                                                              prepare_after: int) -> None:
    tree = ModuleTree(moddir, use_cache=False, prepare_after=prepare_after)
    alias = "pci:v00008086d0000100Esv00001AF4sd00001100bc02sc00i00"
    other = "pci:v00008086d00002668sv0sd0bc04sc03i00"
    before = (tree.alias(alias), tree.dep("nic"), tree.alias(other))
    assert before[0] == ["nic"] and before[1] is not None and before[1].deps == ("core",)
    assert tree._loaded           # something is held
    release_memory(_Resolver(tree))
    assert not tree._loaded and tree._alias_search is None
    after = (tree.alias(alias), tree.dep("nic"), tree.alias(other))
    assert after == before


def test_anything_without_a_tree_is_left_alone() -> None:
    release_memory(object())          # a test fake, the broken resolver: no error
    release_memory(None)
