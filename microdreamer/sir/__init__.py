"""Score-based iterative reconstruction: cameras, DDIM numerics, t1/t2 schedules, refiner and the loop."""
