"""Block manager of the paged KV cache: allocation, ref counts, prefix caching, LRU eviction,
and a seeded random workload checked against a simple model of what each block holds."""
import hashlib
import random
import struct

import pytest

from leanlm.kv.blocks import BlockManager, BlockTable


def prefill(bm: BlockManager, tokens: list[int], num_computed: int | None = None) -> tuple[BlockTable, int]:
    """What the engine does for a new prompt: match, grow, compute, commit."""
    table, covered = bm.match_prefix(tokens)
    assert bm.grow(table, len(tokens))
    bm.commit(table, tokens, len(tokens) if num_computed is None else num_computed)
    return table, covered


# ---- construction and allocation ---------------------------------------------------------------

@pytest.mark.parametrize("num_blocks, block_size, bad",
                         [(0, 4, "num_blocks.*0"), (-3, 4, "-3"), (8, 0, "block_size.*0"), (8, 2.5, "2.5")])
def test_bad_constructor_args_name_the_value(num_blocks, block_size, bad):
    with pytest.raises(ValueError, match=bad):
        BlockManager(num_blocks, block_size)


def test_lone_sequence_gets_consecutive_ids():
    bm = BlockManager(16, 4)
    t = bm.new_table()
    assert bm.blocks_needed(t, 10) == 3
    assert bm.grow(t, 10) and t.blocks == [0, 1, 2]
    assert bm.blocks_needed(t, 12) == 0 and bm.grow(t, 12) and t.blocks == [0, 1, 2]
    assert bm.grow(t, 13) and t.blocks == [0, 1, 2, 3]
    assert (bm.num_used, bm.num_free) == (4, 12)


def test_grow_is_all_or_nothing():
    bm = BlockManager(4, 4)
    a, b = bm.new_table(), bm.new_table()
    assert bm.grow(a, 12)                      # 3 of 4 blocks
    assert not bm.grow(b, 8)                   # needs 2, only 1 free
    assert b.blocks == [] and bm.num_free == 1 and bm.num_used == 3
    assert bm.grow(b, 4) and b.blocks == [3]
    assert not bm.grow(a, 13)                  # nothing left: a unchanged
    assert a.blocks == [0, 1, 2] and bm.num_free == 0


def test_freed_blocks_are_reused_lowest_id_first():
    bm = BlockManager(8, 4, enable_prefix_caching=False)
    a, b, c = bm.new_table(), bm.new_table(), bm.new_table()
    bm.grow(a, 8), bm.grow(b, 8), bm.grow(c, 4)   # a=[0,1] b=[2,3] c=[4]
    bm.free(b), bm.free(a)
    d = bm.new_table()
    assert bm.grow(d, 16) and d.blocks == [0, 1, 2, 3]


# ---- ref counts ---------------------------------------------------------------------------------

def test_refcounts_through_match_fork_and_free():
    bm = BlockManager(16, 4)
    prompt = list(range(10))                   # 2 full blocks + 2 tokens
    a, _ = prefill(bm, prompt)
    assert a.blocks == [0, 1, 2] and len(a.hashes) == 2
    b, covered = bm.match_prefix(prompt)
    assert covered == 8 and b.blocks == [0, 1]
    assert [bm.ref_count(x) for x in (0, 1, 2)] == [2, 2, 1]
    f = bm.fork(a)                             # shares only the full hashed blocks
    assert f.blocks == [0, 1] and f.hashes == a.hashes
    assert [bm.ref_count(x) for x in (0, 1, 2)] == [3, 3, 1]
    assert bm.num_used == 3 and bm.num_free == 13
    bm.free(a)
    assert a.blocks == [] and a.hashes == []
    assert [bm.ref_count(x) for x in (0, 1, 2)] == [2, 2, 0]
    bm.free(a)                                 # safe twice
    bm.free(b), bm.free(f)
    assert bm.num_used == 0 and bm.num_free == 16
    assert [bm.ref_count(x) for x in range(16)] == [0] * 16


def test_freeing_a_block_with_ref_zero_raises():
    bm = BlockManager(4, 4)
    with pytest.raises(RuntimeError, match="block 2"):
        bm.free(BlockTable(blocks=[2]))
    t = bm.new_table()
    bm.grow(t, 4)
    stale = BlockTable(blocks=list(t.blocks))  # a copy the engine forgot to drop
    bm.free(t)
    with pytest.raises(RuntimeError, match="ref_count is 0"):
        bm.free(stale)


# ---- prefix caching -----------------------------------------------------------------------------

def test_same_prompt_reuses_physical_blocks_and_counts_hits():
    bm = BlockManager(16, 4)
    prompt = [5, 9, 2, 7, 1, 1, 3, 8, 4, 6]
    a, covered_a = prefill(bm, prompt)
    assert covered_a == 0 and (bm.prefix_cache_queries, bm.prefix_cache_hits) == (10, 0)
    b, covered_b = bm.match_prefix(prompt)
    assert covered_b == 8 and b.blocks == a.blocks[:2] and b.hashes == a.hashes
    assert (bm.prefix_cache_queries, bm.prefix_cache_hits) == (20, 8)
    assert bm.grow(b, len(prompt)) and b.blocks[2] not in a.blocks  # the tail block is b's own


def test_last_token_is_never_matched():
    bm = BlockManager(16, 4)
    prompt = list(range(8))                    # exactly 2 blocks
    a, _ = prefill(bm, prompt)
    assert len(a.hashes) == 2
    b, covered = bm.match_prefix(prompt)
    assert covered == 4 and b.blocks == [a.blocks[0]]  # last block holds the last token: recompute
    c, covered = bm.match_prefix(prompt + [99])
    assert covered == 8 and c.blocks == a.blocks
    d, covered = bm.match_prefix([0])
    assert covered == 0 and d.blocks == []
    e, covered = bm.match_prefix([])
    assert covered == 0 and e.blocks == []


def test_hash_chains_over_the_whole_prefix():
    bm = BlockManager(16, 4)
    head_a, head_b, mid, tail = [1, 2, 3, 4], [9, 9, 9, 9], [5, 6, 7, 8], [0]
    prefill(bm, head_a + mid + tail)
    _, covered = bm.match_prefix(head_b + mid + tail)  # same second block after another head
    assert covered == 0
    _, covered = bm.match_prefix(head_a + [5, 6, 7, 0] + tail)
    assert covered == 4


def test_hash_format_is_blake2b_over_prev_and_int64_le():
    bm = BlockManager(16, 2)
    t, _ = prefill(bm, [3, -1, 2**40, 7, 0])
    want = hashlib.blake2b(t.hashes[0] + struct.pack("<2q", 2**40, 7), digest_size=16).digest()
    assert t.hashes[1] == want


def test_salt_separates_caches():
    prompt = list(range(9))
    h = {salt: prefill(BlockManager(8, 4, salt=salt), prompt)[0].hashes for salt in ("m:fp16", "m:kivi:int2")}
    assert h["m:fp16"][0] != h["m:kivi:int2"][0] and h["m:fp16"][1] != h["m:kivi:int2"][1]
    assert prefill(BlockManager(8, 4, salt="m:fp16"), prompt)[0].hashes == h["m:fp16"]


def test_chunked_commits_hash_like_one_commit():
    prompt = list(range(30, 43))
    bm1, bm2 = BlockManager(8, 4), BlockManager(8, 4)
    one, _ = prefill(bm1, prompt)
    chunked = bm2.new_table()
    bm2.grow(chunked, len(prompt))
    for done in (3, 5, 9, 13):
        bm2.commit(chunked, prompt, done)
        assert len(chunked.hashes) == done // 4
    assert chunked.hashes == one.hashes


def test_commit_rejects_impossible_counts():
    bm = BlockManager(8, 4)
    t = bm.new_table()
    bm.grow(t, 4)
    with pytest.raises(ValueError, match="num_computed"):
        bm.commit(t, [1, 2, 3], 4)
    with pytest.raises(RuntimeError, match="only 1"):
        bm.commit(t, list(range(8)), 8)


def test_concurrent_duplicate_keeps_first_mapping():
    bm = BlockManager(16, 4)
    prompt = list(range(10))
    a, b = bm.match_prefix(prompt)[0], bm.match_prefix(prompt)[0]  # both miss: nothing committed yet
    bm.grow(a, 10), bm.grow(b, 10)
    bm.commit(a, prompt, 10), bm.commit(b, prompt, 10)
    assert b.hashes == a.hashes and set(a.blocks).isdisjoint(b.blocks)
    c, covered = bm.match_prefix(prompt)
    assert covered == 8 and c.blocks == a.blocks[:2]
    assert [bm.ref_count(x) for x in b.blocks] == [1, 1, 1]  # b stays unshared
    longer = prompt + [10, 11, 12]
    bm.grow(b, 13), bm.commit(b, longer, 13)   # b's later blocks still chain correctly
    d, covered = bm.match_prefix(longer + [0])
    assert covered == 12 and d.blocks == a.blocks[:2] + [b.blocks[2]]
    for t in (a, b, c, d):
        bm.free(t)
    assert bm.num_used == 0 and bm.num_free == 16


def test_disabled_prefix_caching():
    bm = BlockManager(8, 4, enable_prefix_caching=False)
    prompt = list(range(10))
    a, covered = prefill(bm, prompt)
    assert covered == 0 and a.hashes == []
    b, covered = bm.match_prefix(prompt)
    assert covered == 0 and b.blocks == [] and b.hashes == []
    assert (bm.prefix_cache_queries, bm.prefix_cache_hits, bm.hit_rate) == (0, 0, 0.0)
    assert bm.fork(a).blocks == []
    bm.free(a)
    c = bm.new_table()
    assert bm.grow(c, 32) and c.blocks == list(range(8))  # nothing kept as cached


def test_hit_rate():
    bm = BlockManager(16, 4)
    assert bm.hit_rate == 0.0
    prompt = list(range(9))
    prefill(bm, prompt)                        # 9 queried, 0 hit
    bm.match_prefix(prompt)                    # 9 queried, 8 hit
    assert bm.hit_rate == pytest.approx(8 / 18)


# ---- eviction -----------------------------------------------------------------------------------

def test_lru_evicts_tail_blocks_first_and_evicted_hashes_stop_matching():
    bm = BlockManager(6, 2)
    prompt = [1, 2, 3, 4, 5, 6, 7]             # blocks 0,1,2 hashed, block 3 partial
    a, _ = prefill(bm, prompt)
    assert a.blocks == [0, 1, 2, 3] and len(a.hashes) == 3
    bm.free(a)                                 # 3 -> free list; LRU (oldest first): 2, 1, 0
    assert bm.num_free == 6 and bm.num_used == 0
    other = bm.new_table()
    assert bm.grow(other, 6) and other.blocks == [3, 4, 5]  # free list first, cache untouched
    _, covered = bm.match_prefix(prompt)
    assert covered == 6                        # all 3 cached blocks still match (refs taken)
    bm.free(_)                                 # back to LRU, same order: 2, 1, 0
    assert bm.grow(other, 8) and other.blocks[-1] == 2  # evicts a's tail block first
    t, covered = bm.match_prefix(prompt)
    assert covered == 4 and t.blocks == [0, 1]
    bm.free(t)                                 # LRU: 1, 0
    assert bm.grow(other, 10) and other.blocks[-1] == 1
    assert bm.match_prefix(prompt)[1] == 2


def test_lru_evicts_least_recently_freed_sequence_first():
    bm = BlockManager(4, 2)
    p, q = [1, 2, 0], [3, 4, 0]
    a, _ = prefill(bm, p, 2)
    b, _ = prefill(bm, q, 2)
    bm.free(a), bm.free(b)                     # each has a 2nd, unhashed block -> free list
    x = bm.new_table()
    assert bm.grow(x, 6)                       # 2 free + 1 eviction: a's hashed block (freed first)
    bm.free(x)
    assert bm.match_prefix(p)[1] == 0 and bm.match_prefix(q)[1] == 2


def test_matched_evictable_block_leaves_the_lru():
    bm = BlockManager(4, 2)
    prompt = [1, 2, 3]
    a, _ = prefill(bm, prompt)                 # block 0 hashed, block 1 partial
    bm.free(a)
    assert bm.num_free == 4
    b, covered = bm.match_prefix(prompt)
    assert covered == 2 and b.blocks == [0] and bm.num_free == 3 and bm.num_used == 1
    c = bm.new_table()
    assert bm.grow(c, 6) and 0 not in c.blocks  # block 0 cannot be evicted while matched
    assert not bm.grow(c, 8)


def test_reset_prefix_cache():
    bm = BlockManager(8, 4)
    prompt = list(range(9))
    a, _ = prefill(bm, prompt)
    assert not bm.reset_prefix_cache()         # in use: refused, nothing dropped
    bm.free(a)
    t, covered = bm.match_prefix(prompt)
    assert covered == 8
    assert not bm.reset_prefix_cache()         # matched blocks are in use again
    bm.free(t)
    assert bm.reset_prefix_cache()
    assert bm.match_prefix(prompt)[1] == 0 and bm.num_free == 8
    t = bm.new_table()
    assert bm.grow(t, 32) and t.blocks == list(range(8))


# ---- randomized workload against a model --------------------------------------------------------

def test_random_workload_keeps_invariants():
    rng = random.Random(1234)
    bs, nb = 4, 24
    bm = BlockManager(nb, bs, salt="test")
    content: dict[int, list] = {}              # physical block -> token written at each slot
    live: list[dict] = []                      # {table, tokens, computed}
    heads = [[rng.randrange(50) for _ in range(rng.randrange(1, 14))] for _ in range(4)]
    hits = queries = 0

    def compute(s, upto):
        # The engine writes KV only for new tokens; they must land in blocks this sequence owns alone.
        for pos in range(s["computed"], upto):
            block = s["table"].blocks[pos // bs]
            assert bm.ref_count(block) == 1, "writing into a shared block"
            content.setdefault(block, [None] * bs)[pos % bs] = s["tokens"][pos]
        s["computed"] = upto
        bm.commit(s["table"], s["tokens"], upto)

    def check():
        expected = {}
        for s in live:
            t = s["table"]
            for b in t.blocks:
                expected[b] = expected.get(b, 0) + 1
            assert len(t.hashes) == min(s["computed"], len(s["tokens"])) // bs
            for i in range(s["computed"]):     # every computed token is what the block holds
                assert content[t.blocks[i // bs]][i % bs] == s["tokens"][i]
        assert [bm.ref_count(b) for b in range(nb)] == [expected.get(b, 0) for b in range(nb)]
        assert bm.num_used == len(expected)
        assert bm.num_free + bm.num_used == nb
        assert (bm.prefix_cache_queries, bm.prefix_cache_hits) == (queries, hits)

    for _ in range(3000):
        op = rng.random()
        if op < 0.25 or not live:              # new request, often sharing a head
            tokens = rng.choice(heads) + [rng.randrange(50) for _ in range(rng.randrange(1, 10))]
            table, covered = bm.match_prefix(tokens)
            queries, hits = queries + len(tokens), hits + covered
            assert covered % bs == 0 and covered <= len(tokens) - 1
            s = {"table": table, "tokens": tokens, "computed": covered}
            if bm.grow(table, len(tokens)):
                live.append(s)
            else:
                bm.free(table)                 # admission failed: give the matched refs back
        elif op < 0.7:                         # one step: a prefill chunk or a decode token
            s = rng.choice(live)
            if s["computed"] == len(s["tokens"]):
                if not bm.grow(s["table"], len(s["tokens"]) + 1):
                    continue
                s["tokens"].append(rng.randrange(50))
            compute(s, rng.randint(s["computed"] + 1, len(s["tokens"])))
        elif op < 0.8:                         # fork (n > 1 sampling)
            s = rng.choice(live)
            t = bm.fork(s["table"])
            n = len(t.blocks) * bs
            f = {"table": t, "tokens": s["tokens"][:n] + [rng.randrange(50)], "computed": n}
            if bm.grow(t, len(f["tokens"])):
                live.append(f)
            else:
                bm.free(t)
        elif op < 0.995:
            s = live.pop(rng.randrange(len(live)))
            bm.free(s["table"])
        else:                                  # reset, sometimes after draining (then it must work)
            if rng.random() < 0.5:
                while live:
                    bm.free(live.pop()["table"])
            assert bm.reset_prefix_cache() == (bm.num_used == 0)
        check()
    assert hits > 0 and bm.hit_rate == pytest.approx(hits / queries)
    for s in live:
        bm.free(s["table"])
    assert bm.num_used == 0 and bm.num_free == nb
