// The seeded latent sampler of pipeline/core/images.py (sample_latents), bit for bit, so the page
// draws a seed's digits itself exactly as the service does for the same seed.
//
// splitmix64 over a counter, in BigInt (JavaScript numbers hold only 53 bits): element i of
// the row-major [n, latentDim] array depends only on (seed, i).
//   uniform: 2 u(i) - 1        normal: sqrt(-2 ln(1 - u(2i))) cos(2 pi u(2i + 1))   (Box-Muller)
// then cast to float32. Also the interpolation of the latent walk, shared by both modes.

const MASK = (1n << 64n) - 1n;
const TWO_POW_MINUS_53 = 2 ** -53;

function splitmix64(x) {
  let z = (x + 0x9e3779b97f4a7c15n) & MASK;
  z = ((z ^ (z >> 30n)) * 0xbf58476d1ce4e5b9n) & MASK;
  z = ((z ^ (z >> 27n)) * 0x94d049bb133111ebn) & MASK;
  return z ^ (z >> 31n);
}

/** float64 [count] in [0, 1): the counter stream keyed by seed. */
function uniform01(seed, count) {
  const key = splitmix64(BigInt(seed) & MASK);
  const out = new Float64Array(count);
  for (let k = 0; k < count; k++) {
    out[k] = Number(splitmix64((key + BigInt(k)) & MASK) >> 11n) * TWO_POW_MINUS_53;
  }
  return out;
}

/** Float32Array [n * latentDim] (row-major): N(0, 1) ("normal") or U(-1, 1) ("uniform"). */
export function sampleLatents(noise, n, latentDim, seed) {
  const count = n * latentDim;
  const out = new Float32Array(count); // storing rounds each float64 to float32
  if (noise === "uniform") {
    const u = uniform01(seed, count);
    for (let i = 0; i < count; i++) out[i] = 2 * u[i] - 1;
  } else if (noise === "normal") {
    const u = uniform01(seed, 2 * count);
    for (let i = 0; i < count; i++) {
      out[i] = Math.sqrt(-2 * Math.log1p(-u[2 * i])) * Math.cos(2 * Math.PI * u[2 * i + 1]);
    }
  } else {
    throw new Error(`noise: got ${JSON.stringify(noise)}; allowed: normal, uniform`);
  }
  return out;
}

/** The point t in [0, 1] between latent vectors a and b. Normal noise walks the great circle
 * (slerp): a straight line passes near the origin, where N(0, 1) vectors never are, and the
 * digits there fade. Uniform noise walks straight, which stays inside [-1, 1]. */
export function interpolate(noise, a, b, t) {
  const out = new Float32Array(a.length);
  let omega = 0;
  if (noise === "normal") {
    let dot = 0;
    let na = 0;
    let nb = 0;
    for (let i = 0; i < a.length; i++) {
      dot += a[i] * b[i];
      na += a[i] * a[i];
      nb += b[i] * b[i];
    }
    omega = Math.acos(Math.min(1, Math.max(-1, dot / Math.sqrt(na * nb || 1))));
  }
  if (omega < 1e-6) {
    for (let i = 0; i < a.length; i++) out[i] = (1 - t) * a[i] + t * b[i];
    return out;
  }
  const wa = Math.sin((1 - t) * omega) / Math.sin(omega);
  const wb = Math.sin(t * omega) / Math.sin(omega);
  for (let i = 0; i < a.length; i++) out[i] = wa * a[i] + wb * b[i];
  return out;
}
