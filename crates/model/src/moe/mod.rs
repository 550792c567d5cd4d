//! DeepSeekMoE (spec section 2): a router with group-limited top-k over sigmoid (or softmax)
//! affinities, routed SwiGLU experts run on contiguous token blocks, shared experts, and the
//! auxiliary-loss-free balancing that steers the router with a per-expert bias.

mod balance;
mod experts;
mod router;

pub use balance::{max_violation, update_balancing_bias, RealTokens};
pub use experts::{run_experts, DeepSeekMoE, ExpertDispatch, ExpertRun, MoeOutput};
pub use router::{Router, Routing};
