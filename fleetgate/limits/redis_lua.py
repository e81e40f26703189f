"""The two Lua scripts the Redis backend runs: admit (decide and take) and settle.

Redis runs a script alone, so each is atomic: no other gateway's command lands between its reads
and its writes. Both read the clock with ``TIME`` (Redis's clock, shared by every gateway).
Their arguments are documented above each; :mod:`fleetgate.limits.redis_backend` builds them.
"""

from __future__ import annotations

# Shared by both scripts: Redis's clock, a bucket's level now (refilled, capped; absent = full),
# and writing a level back with a lifetime that ends once the bucket would be full again.
_LUA_BUCKETS = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local function level(key, cap)
  local h = redis.call('HMGET', key, 'l', 't')
  if not h[1] then return cap end
  local lvl = tonumber(h[1])
  local ts = tonumber(h[2])
  if now > ts then lvl = lvl + (now - ts) * cap / 60 end
  if lvl > cap then lvl = cap end
  return lvl
end
local function store(key, lvl, cap)
  redis.call('HSET', key, 'l', string.format('%.6f', lvl), 't', string.format('%.6f', now))
  redis.call('PEXPIRE', key, math.ceil((cap - lvl) * 60000 / cap) + 1000)
end
"""

# KEYS: buckets (nb), quotas (nq), concurrency hashes (nc).
# ARGV: cost, process id, liveness-key prefix, nb, [capacity, need]*nb, nq, [limit, expireat]*nq,
#       nc, [max]*nc.
# Returns {ok, failure, index, wait_s, quota_used, level_1 .. level_nb}: levels after the take
# when ok, as they are when refused. Numbers that may be fractional travel as strings (a Lua
# number in a reply is truncated to an integer).
ADMIT = _LUA_BUCKETS + """
local cost = tonumber(ARGV[1])
local proc = ARGV[2]
local alive = ARGV[3]
local nb = tonumber(ARGV[4])
local a, k = 5, 1
local levels, caps, needs = {}, {}, {}
local rfail, ridx, rwait = 0, 0, 0
for i = 1, nb do
  local cap, need = tonumber(ARGV[a]), tonumber(ARGV[a + 1])
  a = a + 2
  local lvl = level(KEYS[k], cap)
  levels[i], caps[i], needs[i] = lvl, cap, need
  if lvl < need then
    local w = (need - lvl) * 60 / cap
    if rfail == 0 or w > rwait then rfail, ridx, rwait = 1, i, w end
  end
  k = k + 1
end
local nq = tonumber(ARGV[a])
a = a + 1
local qstart = k
local qfail, qidx, qused = 0, 0, 0
for i = 1, nq do
  local lim = tonumber(ARGV[a])
  a = a + 2
  local used = tonumber(redis.call('GET', KEYS[k]) or '0')
  if qfail == 0 and used + cost > lim then qfail, qidx, qused = 1, i, used end
  k = k + 1
end
local nc = tonumber(ARGV[a])
a = a + 1
local cstart = k
local cfail, cidx = 0, 0
for i = 1, nc do
  local max = tonumber(ARGV[a])
  a = a + 1
  local h = redis.call('HGETALL', KEYS[k])
  local total = 0
  for j = 1, #h, 2 do
    local f = h[j]
    if f == proc or redis.call('EXISTS', alive .. f) == 1 then
      total = total + tonumber(h[j + 1])
    else
      redis.call('HDEL', KEYS[k], f)  -- a process that died holding slots
    end
  end
  if cfail == 0 and total >= max then cfail, cidx = 1, i end
  k = k + 1
end
local function reply(ok, failure, idx, wait, used)
  local r = {ok, failure, idx, string.format('%.6f', wait), used}
  for i = 1, nb do r[#r + 1] = string.format('%.6f', levels[i]) end
  return r
end
if qfail == 1 then return reply(0, 'quota', qidx, 0, qused) end
if rfail == 1 then return reply(0, 'rate', ridx, rwait, 0) end
if cfail == 1 then return reply(0, 'concurrency', cidx, 1, 0) end
for i = 1, nb do
  levels[i] = levels[i] - needs[i]
  store(KEYS[i], levels[i], caps[i])
end
a = 5 + 2 * nb + 1
for i = 0, nq - 1 do
  redis.call('INCRBY', KEYS[qstart + i], cost)
  redis.call('EXPIREAT', KEYS[qstart + i], ARGV[a + 2 * i + 1])
end
for i = 0, nc - 1 do
  redis.call('HINCRBY', KEYS[cstart + i], proc, 1)
end
return reply(1, '', 0, 0, 0)
"""

# KEYS: tpm buckets (nb), quotas (nq), concurrency hashes (nc), then the settle's own marker.
# ARGV: refund (charged - actual, may be negative), process id, nb, [capacity]*nb, nq, nc.
# The marker makes a settle idempotent: a batch resent after a connection broke mid-way (some of
# it applied, some not) applies each settle once. It lives a minute (the sender resends within
# seconds of Redis answering again): at 1,000 requests a second, some 60,000 small keys.
SETTLE = """
if redis.call('SET', KEYS[#KEYS], '1', 'NX', 'PX', 60000) == false then return 0 end
""" + _LUA_BUCKETS + """
local refund = tonumber(ARGV[1])
local proc = ARGV[2]
local nb = tonumber(ARGV[3])
local k = 1
for i = 1, nb do
  local cap = tonumber(ARGV[3 + i])
  if refund ~= 0 then
    local lvl = level(KEYS[k], cap) + refund
    if lvl > cap then lvl = cap end
    store(KEYS[k], lvl, cap)
  end
  k = k + 1
end
local nq = tonumber(ARGV[4 + nb])
local nc = tonumber(ARGV[5 + nb])
for i = 1, nq do
  -- A counter that expired (its period is long over) is not brought back.
  if refund ~= 0 and redis.call('EXISTS', KEYS[k]) == 1 then
    redis.call('DECRBY', KEYS[k], refund)
  end
  k = k + 1
end
for i = 1, nc do
  if redis.call('HINCRBY', KEYS[k], proc, -1) <= 0 then redis.call('HDEL', KEYS[k], proc) end
  k = k + 1
end
return 1
"""
