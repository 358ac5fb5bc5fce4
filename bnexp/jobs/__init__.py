"""Jobs: one job's lifecycle (CLI and launcher alike), which runs share a group, group processes, clusters."""
