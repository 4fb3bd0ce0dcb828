"""r2m_ray.eval."""
