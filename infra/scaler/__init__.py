"""The autoscaler: a pure policy, a control loop, and backends that start and stop workers."""
