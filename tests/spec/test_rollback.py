"""BlockManager.truncate: rejected drafts' blocks go back to the free pool; committed blocks stay."""
import pytest

from leanlm.kv.blocks import BlockManager


def test_truncate_frees_the_tail_only():
    bm = BlockManager(8, 4)
    table = bm.new_table()
    assert bm.grow(table, 6)                   # 6 committed tokens: 2 blocks
    bm.commit(table, list(range(6)), 6)        # block 0 full and hashed
    assert bm.grow(table, 6 + 7)               # room for 7 drafts: 4 blocks
    assert bm.num_used == 4
    dropped = bm.truncate(table, 6 + 2)        # 2 drafts accepted
    assert len(dropped) == 2 and len(table.blocks) == 2
    assert bm.num_used == 2 and bm.num_free == 6
    assert all(bm.ref_count(b) == 0 for b in dropped)
    with pytest.raises(ValueError, match="committed blocks"):
        bm.truncate(table, 3)
    bm.free(table)
    assert bm.num_used == 0
