"""Device profiles, flashing/deploy packages and the local test harnesses for real boards."""
