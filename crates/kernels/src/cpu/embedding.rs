//! Token embedding: a gather of table rows forward, a scatter-add of their gradients backward
//! (MoE token permutation for expert dispatch is the same pair of moves over hidden states).

/// `out[i] = table[ids[i]]`, rows of `dim`. Ids are validated by the caller (`< table rows`).
pub fn embedding_forward(table: &[f32], dim: usize, ids: &[u32], out: &mut [f32]) {
    assert_eq!(out.len(), ids.len() * dim, "embedding_forward: out is not [ids, dim]");
    for (row, &id) in out.chunks_exact_mut(dim.max(1)).zip(ids) {
        let start = id as usize * dim;
        row.copy_from_slice(&table[start..start + dim]);
    }
}

/// `dtable[ids[i]] += dout[i]` for every i, in index order (repeated ids add up); `dtable` is
/// overwritten, not accumulated into.
pub fn embedding_backward(dout: &[f32], dim: usize, ids: &[u32], dtable: &mut [f32]) {
    assert_eq!(dout.len(), ids.len() * dim, "embedding_backward: dout is not [ids, dim]");
    dtable.fill(0.0);
    for (row, &id) in dout.chunks_exact(dim.max(1)).zip(ids) {
        let start = id as usize * dim;
        for (d, &g) in dtable[start..start + dim].iter_mut().zip(row) {
            *d += g;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rows_are_gathered_and_repeated_ids_add_their_gradients() {
        let table: Vec<f32> = (0..12).map(|i| i as f32).collect(); // 4 rows of 3
        let ids = [2, 0, 2];
        let mut out = vec![0.0; 9];
        embedding_forward(&table, 3, &ids, &mut out);
        assert_eq!(out, vec![6.0, 7.0, 8.0, 0.0, 1.0, 2.0, 6.0, 7.0, 8.0]);
        let mut dt = vec![9.0; 12];
        embedding_backward(&[1.0; 9], 3, &ids, &mut dt);
        assert_eq!(dt, vec![1.0, 1.0, 1.0, 0.0, 0.0, 0.0, 2.0, 2.0, 2.0, 0.0, 0.0, 0.0]);
    }
}
