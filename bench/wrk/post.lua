-- wrk script: POST a 1 KB JSON body as several known clients, in turn, and
-- check that the upstream received the memory user id each client should get.
--
-- The fake upstream echoes the User-Agent and x-sm-user-id it received
-- (x-echo-ua, x-echo-user-id), so each response can be checked on its own.
-- Script arguments (after "--"): "direct" or "proxy", then one argument per
-- client, "User-Agent<TAB>expected user id". With "direct" the client sends
-- the expected x-sm-user-id itself (no proxy in between to add it).
-- done() prints one line "BENCH_JSON {...}" with the figures the benchmark reads.

local clients = {}
local expected = {}

-- A chat request padded to exactly 1024 bytes.
local head = '{"model":"memproxy-demo","stream":false,"messages":[{"role":"user","content":"'
local tail = '"}]}'
local body = head .. string.rep("x", 1024 - #head - #tail) .. tail

local threads = {}
local prepared = {}
local next_index = 0
checked = 0
wrong = 0

function setup(thread)
  table.insert(threads, thread)
end

function init(args)
  local direct = args[1] == "direct"
  for i = 2, #args do
    local ua, id = string.match(args[i], "^(.-)\t(.*)$")
    clients[#clients + 1] = {ua, id}
    expected[ua] = id
  end
  for i, c in ipairs(clients) do
    local headers = {
      ["Host"] = wrk.headers["Host"],
      ["Content-Type"] = "application/json",
      ["Authorization"] = "Bearer sk-bench",
      ["User-Agent"] = c[1],
    }
    if direct then headers["x-sm-user-id"] = c[2] end
    prepared[i] = wrk.format("POST", "/v1/chat/completions", headers, body)
  end
  -- Each thread starts at a random client; every connection cycles through all of them.
  next_index = math.random(#prepared) - 1
end

function request()
  next_index = next_index % #prepared + 1
  return prepared[next_index]
end

function response(status, headers, body)
  checked = checked + 1
  local ua = headers["x-echo-ua"]
  local id = headers["x-echo-user-id"]
  if ua == nil or id ~= expected[ua] then
    wrong = wrong + 1
  end
end

function done(summary, latency, requests)
  local total_checked, total_wrong = 0, 0
  for _, t in ipairs(threads) do
    total_checked = total_checked + t:get("checked")
    total_wrong = total_wrong + t:get("wrong")
  end
  local points = {}
  local ps = {1, 5, 10, 20, 25, 30, 40, 50, 60, 70, 75, 80, 90, 95, 97, 98, 99, 99.5, 99.9, 99.99}
  for _, p in ipairs(ps) do
    points[#points + 1] = string.format('"%g":%d', p, latency:percentile(p))
  end
  local e = summary.errors
  io.write(string.format(
    'BENCH_JSON {"requests":%d,"duration_us":%d,"bytes":%d,' ..
    '"errors":{"connect":%d,"read":%d,"write":%d,"status":%d,"timeout":%d},' ..
    '"checked":%d,"wrong_id":%d,' ..
    '"latency_us":{"min":%d,"max":%d,"mean":%.1f,"stdev":%.1f,"percentiles":{%s}}}\n',
    summary.requests, summary.duration, summary.bytes,
    e.connect, e.read, e.write, e.status, e.timeout,
    total_checked, total_wrong,
    latency.min, latency.max, latency.mean, latency.stdev, table.concat(points, ",")))
end
