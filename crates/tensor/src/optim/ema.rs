//! An exponential moving average of the parameters, kept in host memory and blended on a thread
//! of its own after each optimizer step. DeepSeek-V3 keeps one to estimate early how the model
//! will do after its learning rate decays, at no cost in GPU memory or step time (TR 3.2.3).
//!
//! `average = decay * average + (1 - decay) * parameter`, element by element in f32, from the
//! parameters' values when the average starts. [`Ema::update`] only copies the parameters (a
//! device-to-host copy on a GPU): the blend runs on the averaging thread while the next step
//! computes, and [`Ema::average`] waits for the blends sent before it. At most one copy waits
//! for the thread: a step that outruns the blend waits for it rather than queueing copies.

use std::collections::BTreeMap;
use std::sync::mpsc::{channel, sync_channel, Receiver, Sender, SyncSender};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use crate::params::ParamStore;
use crate::{Device, Error, Result, Tensor};

/// The moving average of a [`ParamStore`]'s values (see the module docs).
pub struct Ema {
    decay: f64,
    /// Shapes by parameter name, in the store's order.
    shapes: Vec<(String, Vec<usize>)>,
    averages: Arc<Mutex<Vec<Vec<f32>>>>,
    jobs: Option<SyncSender<Job>>,
    worker: Option<JoinHandle<()>>,
}

/// What the averaging thread is sent: parameter values to blend in, or a request to say when
/// every blend sent before it is done.
enum Job {
    Blend(Vec<Vec<f32>>),
    Flush(Sender<()>),
}

impl std::fmt::Debug for Ema {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Ema(decay {}, {} parameters)", self.decay, self.shapes.len())
    }
}

impl Ema {
    /// An average that starts at `params`' values. `decay` must lie in (0, 1).
    pub fn new(decay: f64, params: &ParamStore) -> Result<Ema> {
        Self::start(decay, params, values_of(params)?)
    }

    /// An average restored from the tensors [`Ema::average`] gave (a checkpoint's), one per
    /// parameter of `params`, by name and shape.
    pub fn resume(decay: f64, params: &ParamStore, saved: &BTreeMap<String, Tensor>) -> Result<Ema> {
        let mut values = Vec::with_capacity(params.len());
        for (name, p) in params.iter() {
            let t = saved.get(name).ok_or_else(|| Error::Params(format!("EMA: no average for parameter `{name}`")))?;
            if t.dims() != p.dims() {
                return Err(Error::Params(format!(
                    "EMA: the average of `{name}` has shape {:?}, the parameter {:?}",
                    t.dims(),
                    p.dims()
                )));
            }
            values.push(t.to_vec_f32()?);
        }
        if let Some(extra) = saved.keys().find(|k| !params.contains(k)) {
            return Err(Error::Params(format!("EMA: an average for `{extra}`, which is no parameter")));
        }
        Self::start(decay, params, values)
    }

    fn start(decay: f64, params: &ParamStore, values: Vec<Vec<f32>>) -> Result<Ema> {
        if !(decay > 0.0 && decay < 1.0) {
            return Err(Error::invalid("Ema", format!("decay {decay} is not in (0, 1)")));
        }
        let shapes = params.iter().map(|(n, p)| (n.to_string(), p.dims().to_vec())).collect();
        let averages = Arc::new(Mutex::new(values));
        let (jobs, inbox) = sync_channel(1);
        let mine = averages.clone();
        let worker = std::thread::Builder::new()
            .name("ema".into())
            .spawn(move || average_thread(decay, &mine, inbox))
            .map_err(|e| Error::invalid("Ema", format!("cannot start the averaging thread: {e}")))?;
        Ok(Ema { decay, shapes, averages, jobs: Some(jobs), worker: Some(worker) })
    }

    pub fn decay(&self) -> f64 {
        self.decay
    }

    /// Blends `params` (the store the average started from, just updated) in: their values are
    /// copied now, the arithmetic runs on the averaging thread.
    pub fn update(&mut self, params: &ParamStore) -> Result<()> {
        let same =
            |((name, p), (n, shape)): ((&str, &Tensor), &(String, Vec<usize>))| name == n && p.dims() == &shape[..];
        if params.len() != self.shapes.len() || !params.iter().zip(&self.shapes).all(same) {
            return Err(Error::Params("EMA: the parameters are not the ones the average started from".into()));
        }
        self.send(Job::Blend(values_of(params)?))
    }

    /// The average (f32 host tensors by parameter name), once every blend sent so far is done.
    pub fn average(&self) -> Result<BTreeMap<String, Tensor>> {
        let (done, wait) = channel();
        self.send(Job::Flush(done))?;
        wait.recv().map_err(|_| Error::invalid("Ema", "the averaging thread stopped"))?;
        let averages = self.averages.lock().map_err(|_| Error::invalid("Ema", "the averaging thread panicked"))?;
        self.shapes
            .iter()
            .zip(averages.iter())
            .map(|((name, shape), v)| Ok((name.clone(), Tensor::from_vec(v.clone(), shape, &Device::Cpu)?)))
            .collect()
    }

    fn send(&self, job: Job) -> Result<()> {
        let jobs = self.jobs.as_ref().expect("the sender lives until drop");
        jobs.send(job).map_err(|_| Error::invalid("Ema", "the averaging thread stopped"))
    }
}

impl Drop for Ema {
    fn drop(&mut self) {
        drop(self.jobs.take());
        if let Some(w) = self.worker.take() {
            let _ = w.join();
        }
    }
}

/// Every parameter's values on the host, in the store's order.
fn values_of(params: &ParamStore) -> Result<Vec<Vec<f32>>> {
    params.iter().map(|(_, p)| p.to_vec_f32()).collect()
}

/// The averaging thread: blends what arrives, in order, until the sender goes.
fn average_thread(decay: f64, averages: &Mutex<Vec<Vec<f32>>>, inbox: Receiver<Job>) {
    let (keep, take) = (decay as f32, (1.0 - decay) as f32);
    for job in inbox {
        match job {
            Job::Blend(values) => {
                let mut averages = averages.lock().expect("the EMA's lock is only held here and to read");
                for (avg, new) in averages.iter_mut().zip(&values) {
                    avg.iter_mut().zip(new).for_each(|(a, &p)| *a = keep * *a + take * p);
                }
            }
            Job::Flush(done) => {
                let _ = done.send(());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::randn;

    #[test]
    fn the_average_follows_its_formula_in_order() {
        let mut params = ParamStore::new();
        let w = params.insert("w", &randn(&[3, 2], 1)).unwrap();
        let b = params.insert("b", &randn(&[2], 2)).unwrap();
        let mut ema = Ema::new(0.9, &params).unwrap();
        let mut want: Vec<Vec<f32>> = [&w, &b].map(|t| t.to_vec_f32().unwrap()).to_vec();
        for step in 0..5u64 {
            for (t, seed) in [(&w, 10 + step), (&b, 20 + step)] {
                t.assign(&randn(t.dims(), seed)).unwrap();
            }
            ema.update(&params).unwrap();
            for (avg, t) in want.iter_mut().zip([&w, &b]) {
                for (a, p) in avg.iter_mut().zip(t.to_vec_f32().unwrap()) {
                    *a = 0.9f32 * *a + (1.0 - 0.9f64) as f32 * p;
                }
            }
        }
        let got = ema.average().unwrap();
        assert_eq!(got["w"].to_vec_f32().unwrap(), want[0]);
        assert_eq!(got["b"].to_vec_f32().unwrap(), want[1]);
        assert_eq!(got["w"].dims(), &[3, 2]);

        // Restored from what it gave, it goes on the same way.
        let mut again = Ema::resume(0.9, &params, &got).unwrap();
        ema.update(&params).unwrap();
        again.update(&params).unwrap();
        assert_eq!(
            ema.average().unwrap()["w"].to_vec_f32().unwrap(),
            again.average().unwrap()["w"].to_vec_f32().unwrap()
        );
    }

    #[test]
    fn bad_decays_and_mismatched_state_are_errors() {
        let mut params = ParamStore::new();
        params.insert("w", &randn(&[2], 1)).unwrap();
        for decay in [0.0, 1.0, -0.5, f64::NAN] {
            assert!(Ema::new(decay, &params).unwrap_err().to_string().contains("not in (0, 1)"), "{decay}");
        }
        let wrong: BTreeMap<String, Tensor> = [("w".to_string(), randn(&[3], 2))].into();
        assert!(Ema::resume(0.9, &params, &wrong).unwrap_err().to_string().contains("shape [3]"));
        let missing = BTreeMap::new();
        assert!(Ema::resume(0.9, &params, &missing).unwrap_err().to_string().contains("no average for parameter `w`"));
        let mut ema = Ema::new(0.9, &params).unwrap();
        for (name, shape) in [("v", [2]), ("w", [3])] {
            let mut other = ParamStore::new();
            other.insert(name, &randn(&shape, 1)).unwrap();
            assert!(ema.update(&other).unwrap_err().to_string().contains("not the ones"), "{name} {shape:?}");
        }
    }
}
