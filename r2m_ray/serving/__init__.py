"""r2m_ray.serving: trained reward models behind HTTP (Ray Serve)."""
