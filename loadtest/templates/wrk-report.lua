-- Appended by loadtest/bench.py to every wrk script (scenario scripts must
-- not define done()). Prints one machine-readable line that bench.py parses.
-- Latencies are in microseconds.
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'BENCH_RESULT {"duration_us":%.0f,"requests":%.0f,"bytes":%.0f,' ..
    '"err_connect":%.0f,"err_read":%.0f,"err_write":%.0f,"err_status":%.0f,"err_timeout":%.0f,' ..
    '"lat_min_us":%.0f,"lat_max_us":%.0f,"lat_mean_us":%.2f,"lat_stdev_us":%.2f,' ..
    '"p50_us":%.0f,"p90_us":%.0f,"p99_us":%.0f,"p999_us":%.0f}\n',
    summary.duration, summary.requests, summary.bytes,
    e.connect, e.read, e.write, e.status, e.timeout,
    latency.min, latency.max, latency.mean, latency.stdev,
    latency:percentile(50), latency:percentile(90),
    latency:percentile(99), latency:percentile(99.9)))
end
