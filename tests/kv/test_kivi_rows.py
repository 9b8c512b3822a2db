"""KIVI's residual rows when a prefill chunk crosses a block boundary while every row is taken:
the filling block's row is handed to the block that starts in the same step."""
import torch

from leanlm.kv.quantized import KiviCodec

BS, H, D = 16, 2, 16


def test_chunk_crossing_a_block_reuses_the_filling_blocks_row():
    codec = KiviCodec(1, 4, BS, H, D, torch.float32, torch.device("cpu"), 4, max_partial=2)
    g = torch.Generator().manual_seed(0)
    # bf16-representable: the residual rows are bf16 under float32 compute and read back exactly
    k_all, v_all = (torch.randn(64, H, D, generator=g).bfloat16().float() for _ in range(2))

    def write(slots):
        s = torch.tensor(slots)
        codec.write(0, s, k_all[s], v_all[s])

    write(list(range(0, 5)) + list(range(16, 21)))   # A in block 0, B in block 1: both rows taken
    write(list(range(21, 32)) + list(range(48, 51)))  # B fills block 1 and starts block 3
    assert codec.res_row[1] == -1 and codec.res_row[3] >= 0 and codec.res_row[0] >= 0
    k, v = codec.read_blocks(0, torch.tensor([[1, 3]]))
    # block 3's first tokens come back exactly from its row; block 1 from its 4-bit codes
    assert torch.equal(k[0, 16:19], k_all[48:51]) and torch.equal(v[0, 16:19], v_all[48:51])
    err = (k[0, :16] - k_all[16:32]).abs().max()
    assert 0 < err < (k_all[16:32].amax(0) - k_all[16:32].amin(0)).max() / 15
