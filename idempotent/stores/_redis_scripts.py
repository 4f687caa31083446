"""The Lua scripts of `RedisStore`: one per operation, so each is atomic and one round trip.

Each script implements rules of `idempotent._rules`, named where it is defined:

============  =======================================================================
script        rules
============  =======================================================================
`CLAIM`       CLAIMABLE (insert, take over a lease that ran out, or report), STORE TIME
`CLAIM_MANY`  the same as `CLAIM`, for every key of one slot, on one reading of the clock
`COMPLETE`    FENCED (only the token's owner writes), STORE TIME (completed/expiry times),
              WAKE (publishes on the record's name when a duplicate waits)
`RELEASE`     FENCED (only the owner's in-progress record is deleted), WAKE
`WATCH`       WAKE (a waiting duplicate marks the record, so COMPLETE and RELEASE publish)
`RENEW`       FENCED (only the owner's in-progress lease moves), STORE TIME (new deadline)
`PURGE`       PURGEABLE (expired or older than a cut-off, never a live lease), STORE TIME
============  =======================================================================

REPLAY (what a duplicate gets) is decided in Python, from the record a claim returns.

**STORE TIME.** A script reads the time with ``redis.call('TIME')`` when the caller
passes an empty ``now`` (every call, unless a test injected a clock into the store), and
decides from it whether a lease is live, whether a record expired, and where the new
deadlines are (``now + lease``, ``now + ttl``): the callers send durations, never
deadlines, so a worker whose clock runs ahead cannot take over a live lease and one
whose clock runs behind cannot shorten one. Redis 7 replicates a script's effects (its
writes), not the script, so reading the clock there is allowed and replicas store the
same values; on Redis 5 and 6 the scripts ask for effects replication first
(``redis.replicate_commands()``). A caller that passes ``now`` (an injected clock, tests
only) gets its own time used instead, as before.

On a cluster each record is decided by the clock of the node that holds it; a failover
moves a record to a replica whose clock may differ (keep the nodes on NTP).

What it costs the server (``INFO commandstats`` µs per call, 20,000 pipelined calls per
variant, medians of 21 interleaved rounds, a loaded 2-core machine): a new-key claim
7.1 → 10.7 µs against the scripts that took deadlines from the caller, a complete
4.9 → 7.5, a duplicate's claim 5.6 → 7.2; of that, ``redis.call('TIME')`` is about 1-2 µs
and formatting the deadlines about 0.3-1.5 µs. One loopback round trip took 40-150 µs.

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

Times are epoch seconds as decimal text that reads back as the exact float: the time of
``TIME`` as ``<seconds>.<6-digit microseconds>``, a deadline with 17 significant digits
(``%.17g``, so ``1796311455.1234560`` where Python's ``repr`` would stop a digit earlier),
an injected clock's ``now`` as Python's ``repr``.

Native expiry (``PEXPIRE``, a relative duration) is only a garbage collector, set
``GRACE_MS`` after the record's deadline: whether a lease is live or a record expired is
decided from the stored fields. An in-progress record is kept natively until its
``expires_at`` (or its lease deadline, whichever is later), not just until its lease, so
a claim after the lease ran out finds it and reports a takeover with its history; a
renewal moves only the lease field (and the native expiry only when the lease would
outlive ``expires_at``). A completed or failed record is kept until its ``expires_at``.

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
CLAIMED = 1  # new key: the caller's token owns it (the reply carries the lease deadline)
TAKEN_OVER = 2  # another worker's lease ran out and was taken over (and the deadline)
FOUND = 3  # completed or failed record (the reply carries the record)
BUSY = 4  # another live lease (the reply carries the record, then the store's now)
BAD_VERSION = -1  # a record of another format version (the reply carries its version)
WRONG_TYPE = -2  # the key holds something that is not a hash

# STORE TIME, shared by every script that reads the clock. `clock(arg)` is the caller's
# `now` when it sent one (an injected test clock), else Redis' own TIME; it returns the
# number and its text as stored. `num(x)` is text that reads back as exactly x (17
# significant digits: one format, where a search for the shortest cost ~1 µs a call).
_TIME = """
local function num(x) return string.format('%.17g', x) end
local function clock(arg)
  if arg ~= '' then return tonumber(arg), arg end
  if redis.replicate_commands then redis.replicate_commands() end  -- Redis 5, 6
  local t = redis.call('TIME')
  local s = string.format('%s.%06d', t[1], t[2])
  return tonumber(s), s
end
"""

# Shared by the claim scripts: one key's claim (rule CLAIMABLE). The record fields come
# back in the order v s f r t l c d e, after the code; a claim that owns the key gets the
# lease deadline after the code.
_CLAIM_ONE = _TIME + """
local V = '1'
local function claim_one(k, now, snow, token, lease, ttl, keep_ms, fp)
  local rec = redis.pcall('HMGET', k, 'v', 's', 'f', 'r', 't', 'l', 'c', 'd', 'e')
  if rec.err then return {-2, rec.err} end
  local code = 1
  if rec[1] then
    if rec[1] ~= V then return {-1, rec[1]} end
    if tonumber(rec[9]) > now then  -- not expired
      if rec[2] ~= 'i' then
        table.insert(rec, 1, 3)
        return rec
      end
      if tonumber(rec[6]) > now then  -- a live lease
        if rec[5] == token then return {1, rec[6]} end  -- our own claim, sent again
        table.insert(rec, 1, 4)  -- another worker's
        rec[11] = snow
        return rec
      end
      code = 2  -- its lease ran out: a takeover
    end
    redis.call('DEL', k)
  elseif rec[2] or rec[5] or rec[9] then  -- a record without a version
    return {-1, ''}
  end
  local lease_until = num(now + lease)
  if fp then
    redis.call('HSET', k, 'v', V, 's', 'i', 't', token, 'l', lease_until, 'c', snow,
               'e', num(now + ttl), 'f', fp)
  else
    redis.call('HSET', k, 'v', V, 's', 'i', 't', token, 'l', lease_until, 'c', snow,
               'e', num(now + ttl))
  end
  redis.call('PEXPIRE', k, keep_ms)
  return {code, lease_until}
end
"""

#: CLAIMABLE, STORE TIME. KEYS[1] record; ARGV now ('' for Redis' TIME), token, lease,
#: ttl (seconds), keep_ms (native expiry: the later of lease and ttl, plus the grace)
#: [, fingerprint].
CLAIM = _CLAIM_ONE + """
local now, snow = clock(ARGV[1])
return claim_one(KEYS[1], now, snow, ARGV[2], tonumber(ARGV[3]), tonumber(ARGV[4]), ARGV[5],
                 ARGV[6])
"""

#: CLAIMABLE, STORE TIME. KEYS records (one slot on a cluster); ARGV now ('' for TIME),
#: lease, ttl, keep_ms, then one token per key. One reply per key, as `CLAIM`'s.
CLAIM_MANY = _CLAIM_ONE + """
local now, snow = clock(ARGV[1])
local lease, ttl = tonumber(ARGV[2]), tonumber(ARGV[3])
local out = {}
for i, k in ipairs(KEYS) do
  out[i] = claim_one(k, now, snow, ARGV[4 + i], lease, ttl, ARGV[4], nil)
end
return out
"""

# FENCED, shared by the other scripts: 1 the token owns the key, 0 it does not, -1 another
# format version, -2 not a hash; and the fields v s t d e w (w: a duplicate waits, WAKE).
_OWNED = """
local V = '1'
local function owned(k, token)
  local rec = redis.pcall('HMGET', k, 'v', 's', 't', 'd', 'e', 'w')
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

#: FENCED, STORE TIME. KEYS[1] record; ARGV token, state (c|f), now ('' for TIME), ttl
#: (seconds), ttl_ms (native expiry)[, result]. 1 done, else an `_OWNED` code.
COMPLETE = _TIME + _OWNED + """
local k = KEYS[1]
local ok, rec = owned(k, ARGV[1])
if ok ~= 1 then return ok end
local now, snow = clock(ARGV[3])
if ARGV[6] then
  redis.call('HSET', k, 's', ARGV[2], 'e', num(now + tonumber(ARGV[4])), 'd', rec[4] or snow,
             'r', ARGV[6])
  redis.call('HDEL', k, 'l', 'w')
else
  redis.call('HSET', k, 's', ARGV[2], 'e', num(now + tonumber(ARGV[4])), 'd', rec[4] or snow)
  redis.call('HDEL', k, 'l', 'r', 'w')
end
redis.call('PEXPIRE', k, ARGV[5])
-- WAKE: only when a duplicate said it waits; pcall: a user without pub/sub rights
-- (ACL channels) still completes, its waiters poll
if rec[6] then redis.pcall('PUBLISH', k, ARGV[2]) end
return 1
"""

#: FENCED. KEYS[1] record; ARGV token. Deletes an in-progress record the token owns.
RELEASE = _OWNED + """
local ok, rec = owned(KEYS[1], ARGV[1])
if ok ~= 1 then return ok end
if rec[2] ~= 'i' then return 0 end
redis.call('DEL', KEYS[1])
if rec[6] then redis.pcall('PUBLISH', KEYS[1], 'r') end  -- WAKE (see COMPLETE)
return 1
"""

#: WAKE. KEYS[1] record. A duplicate about to wait for it (already subscribed to the
#: record's name): marks the in-progress record (field w) so that COMPLETE and RELEASE
#: publish, atomically with the check. 1 marked (wait), 0 not in progress (look again).
WATCH = """
local s = redis.pcall('HGET', KEYS[1], 's')
if type(s) ~= 'string' or s ~= 'i' then return 0 end
redis.call('HSET', KEYS[1], 'w', '1')
return 1
"""

#: FENCED, STORE TIME. KEYS[1] record; ARGV token, now ('' for TIME), lease (seconds),
#: lease_ms (the lease plus the grace). Answers the new lease deadline (text), or an
#: `_OWNED` code (0 also when the record is no longer in progress). The native expiry is
#: moved only when the lease would outlive ``expires_at``.
RENEW = _TIME + _OWNED + """
local k = KEYS[1]
local ok, rec = owned(k, ARGV[1])
if ok ~= 1 then return ok end
if rec[2] ~= 'i' then return 0 end
local now = clock(ARGV[2])
local until_ = now + tonumber(ARGV[3])
local lease_until = num(until_)
redis.call('HSET', k, 'l', lease_until)
if until_ > tonumber(rec[5]) then redis.call('PEXPIRE', k, ARGV[4]) end
return lease_until
"""

#: PURGEABLE, STORE TIME. KEYS records (one slot on a cluster); ARGV now ('' for TIME)
#: [, older_than (seconds)]. Deletes the records past expires_at (or, with older_than,
#: created before now - older_than), except an in-progress record whose lease is live;
#: skips keys that are not records of this format. Returns how many it deleted.
PURGE = _TIME + """
local V = '1'
local now = clock(ARGV[1])
local before = nil
if ARGV[2] then before = now - tonumber(ARGV[2]) end
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
