"""What a worker measures once a backend exists: the scenarios, throughput, quality and the trackers."""
