"""The inference side: schedulers, model runners and the hosts they run in."""
