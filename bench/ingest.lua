-- wrk script for bench/gateway: one form submission per request, as a web form posts
-- it, keyed by one of 1000 students so the records spread over the topic's partitions.
local counter = 0
local body = "name=Ann+Lee&email=ann%40example.org&course=physics&year=2&comments=looking+forward+to+it"
local headers = { ["Content-Type"] = "application/x-www-form-urlencoded" }

request = function()
  counter = counter + 1
  return wrk.format("POST", "/ingest/forms?key=student-" .. (counter % 1000), headers, body)
end
