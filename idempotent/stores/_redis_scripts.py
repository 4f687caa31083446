"""The Lua scripts of `RedisStore`: one per operation, so each is atomic and one round trip.

A record is one Redis hash of a few short fields. Measured against a packed string (one
``GET`` and one ``SET`` and a ``string.match``; ``benchmarks/bench_redis.py``), the hash
costs the server a few µs more per script call: 8-13 against 5-9 µs for a new-key claim,
6-10 against 4-6 µs for a duplicate, 6-10 against 6-8 µs for a complete, on a shared 2-core
machine where one loopback round trip took 40-150 µs. Kept: nothing is escaped or parsed in
Lua, any byte can be in any field, ``redis-cli HGETALL`` shows a record; a packed layout
could come later as format version 2 (every record carries its version)::

    v  format version ("1")         s  state: i(n progress) | c(ompleted) | f(ailed)
    f  fingerprint (absent: None)   r  result bytes (absent: None)
    t  fencing token                l  lease deadline (in progress only)
    c  created_at                   d  completed_at    e  expires_at

Times are epoch seconds as written by Python's ``repr(float)`` (exact round trip); the
scripts compare them with the caller's ``now``, never with Redis' own clock, so that the
caller's clock is the only clock (tests move it by hand). Native expiry (``PEXPIRE``, a
relative duration) is only a garbage-collection backstop set ``GRACE_MS`` after the
deadline: whether a lease is live or a record expired is decided from the stored fields.

Every script reads records with ``redis.pcall`` and answers a code instead of failing:
a key of another type, or a record of another format version, reaches Python as a code
that becomes a clear error there, never as a Lua error. A hash holding our state, token or
deadline fields but no version counts as a record of another version.
"""

from __future__ import annotations

#: The record format this version reads and writes.
FORMAT_VERSION = "1"
#: How long after its deadline a record's native expiry removes it.
GRACE_MS = 1000

# Reply codes of the claim scripts (first element of the reply).
CLAIMED = 1  # new key: the caller's token owns it
TAKEN_OVER = 2  # another worker's expired lease was taken over
FOUND = 3  # completed or failed record (the reply carries the record)
BUSY = 4  # another live lease (the reply carries the record)
BAD_VERSION = -1  # a record of another format version (the reply carries its version)
WRONG_TYPE = -2  # the key holds something that is not a hash

# Shared by the claim scripts: one key's claim. The record fields come back in the order
# v s f r t l c d e, after the code.
_CLAIM_ONE = """
local V = '1'
local function claim_one(k, now, snow, token, lease_until, expires_at, lease_ms, fp)
  local rec = redis.pcall('HMGET', k, 'v', 's', 'f', 'r', 't', 'l', 'c', 'd', 'e')
  if rec.err then return {-2, rec.err} end
  local code = 1
  if rec[1] then
    if rec[1] ~= V then return {-1, rec[1]} end
    local live = tonumber(rec[9]) > now
    if live and rec[2] ~= 'i' then
      table.insert(rec, 1, 3)
      return rec
    end
    if live then
      if rec[5] == token then return {1} end
      if tonumber(rec[6]) > now then
        table.insert(rec, 1, 4)
        return rec
      end
    end
    redis.call('DEL', k)
    if rec[2] == 'i' then code = 2 end
  elseif rec[2] or rec[5] or rec[9] then  -- a record without a version
    return {-1, ''}
  end
  if fp then
    redis.call('HSET', k, 'v', V, 's', 'i', 't', token, 'l', lease_until, 'c', snow,
               'e', expires_at, 'f', fp)
  else
    redis.call('HSET', k, 'v', V, 's', 'i', 't', token, 'l', lease_until, 'c', snow,
               'e', expires_at)
  end
  redis.call('PEXPIRE', k, lease_ms)
  return {code}
end
"""

#: KEYS[1] record; ARGV now, token, lease_until, expires_at, lease_ms[, fingerprint].
CLAIM = _CLAIM_ONE + """
return claim_one(KEYS[1], tonumber(ARGV[1]), ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5],
                 ARGV[6])
"""

#: KEYS records (one slot on a cluster); ARGV now, lease_until, expires_at, lease_ms,
#: then one token per key. One reply per key, as `CLAIM`'s.
CLAIM_MANY = _CLAIM_ONE + """
local now = tonumber(ARGV[1])
local out = {}
for i, k in ipairs(KEYS) do
  out[i] = claim_one(k, now, ARGV[1], ARGV[4 + i], ARGV[2], ARGV[3], ARGV[4], nil)
end
return out
"""

# The other scripts answer: 1 done, 0 the token does not own the key, -1 another format
# version, -2 not a hash.
_OWNED = """
local V = '1'
local function owned(k, token)
  local rec = redis.pcall('HMGET', k, 'v', 's', 't', 'd')
  if rec.err then return -2, rec end
  if not rec[1] then
    if rec[2] or rec[3] then return -1, rec end  -- a record without a version
    return 0, rec
  end
  if rec[1] ~= V then return -1, rec end
  if rec[3] ~= token then return 0, rec end
  return 1, rec
end
"""

#: KEYS[1] record; ARGV token, state (c|f), now, expires_at, ttl_ms[, result].
COMPLETE = _OWNED + """
local k = KEYS[1]
local ok, rec = owned(k, ARGV[1])
if ok ~= 1 then return ok end
if ARGV[6] then
  redis.call('HSET', k, 's', ARGV[2], 'e', ARGV[4], 'd', rec[4] or ARGV[3], 'r', ARGV[6])
  redis.call('HDEL', k, 'l')
else
  redis.call('HSET', k, 's', ARGV[2], 'e', ARGV[4], 'd', rec[4] or ARGV[3])
  redis.call('HDEL', k, 'l', 'r')
end
redis.call('PEXPIRE', k, ARGV[5])
return 1
"""

#: KEYS[1] record; ARGV token. Deletes an in-progress record the token owns.
RELEASE = _OWNED + """
local ok, rec = owned(KEYS[1], ARGV[1])
if ok ~= 1 then return ok end
if rec[2] ~= 'i' then return 0 end
redis.call('DEL', KEYS[1])
return 1
"""

#: KEYS[1] record; ARGV token, lease_until, lease_ms.
RENEW = _OWNED + """
local ok, rec = owned(KEYS[1], ARGV[1])
if ok ~= 1 then return ok end
if rec[2] ~= 'i' then return 0 end
redis.call('HSET', KEYS[1], 'l', ARGV[2])
redis.call('PEXPIRE', KEYS[1], ARGV[3])
return 1
"""

#: KEYS records (one slot on a cluster); ARGV now[, created_before]. Deletes the records
#: past expires_at (or, with created_before, created before it), except an in-progress
#: record whose lease is live; skips keys that are not records of this format. Returns
#: how many it deleted.
PURGE = """
local V = '1'
local now = tonumber(ARGV[1])
local before = tonumber(ARGV[2])
local n = 0
for _, k in ipairs(KEYS) do
  local rec = redis.pcall('HMGET', k, 'v', 's', 'l', 'c', 'e')
  if not rec.err and rec[1] == V then
    local old = tonumber(rec[5]) <= now or (before ~= nil and tonumber(rec[4]) < before)
    local leased = rec[2] == 'i' and rec[3] and tonumber(rec[3]) > now
    if old and not leased then
      redis.call('DEL', k)
      n = n + 1
    end
  end
end
return n
"""
